"""Batch mode (`edge_agent.batch.score_file`): chunked CSV and Parquet in and out, progress, and
bad files, against real bundles and real files."""

from __future__ import annotations

import csv
import io
import math
import os
import pty
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import InputError
from tests.conftest import make_classification_data, make_regression_data
from tests.edge_agent.conftest import sensor_frame

ROOT = Path(__file__).resolve().parents[2]
N = 52  # rows per file: 7 chunks of 7 and a last one of 3
CHUNK = 7


@pytest.fixture
def make_agent(tmp_path: Path, keypair: Any) -> Iterator[Callable[[Any], Any]]:
    """An in-process Agent serving a bundle (own data dir); closed after the test."""
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig

    agents: list[Any] = []

    def _make(bundle: Any) -> Any:
        config = AgentConfig(data_dir=tmp_path / f"data{len(agents)}",
                             trusted_keys=(keypair.public_path,), bundle=bundle.path)
        agents.append(Agent(config))
        return agents[-1]

    yield _make
    for a in agents:
        a.close()


def _spy_chunks(agent: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row count of each predict call the batch makes."""
    sizes: list[int] = []
    real = agent.predict

    def predict(inputs: Any, **kw: Any) -> Any:
        result = real(inputs, **kw)
        sizes.append(result.n)
        return result

    monkeypatch.setattr(agent, "predict", predict)
    return sizes


def _write_csv(path: Path, columns: dict[str, list[Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(list(columns))
        w.writerows(zip(*columns.values(), strict=True))


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], {h: [r[j] for r in rows[1:]] for j, h in enumerate(rows[0])}


def _matrix_file_columns() -> dict[str, list[Any]]:
    """N rows for small_bundle (f0..f5, CSV text) with a pass-through id; two empty cells."""
    X, _ = make_classification_data(n=600, d=6, seed=11)
    cols: dict[str, list[Any]] = {"row_id": [f"r{k}" for k in range(N)]}
    for i in range(6):
        cols[f"f{i}"] = [f"{v:.6f}" for v in X[400:400 + N, i]]
    cols["f0"][3] = ""
    cols["f4"][N - 1] = ""  # in the last, partial chunk
    return cols


def _sensor_file_columns() -> dict[str, list[Any]]:
    """N rows for columns_bundle (temp, pressure numeric; color text) with pass-throughs."""
    frame, _ = sensor_frame(N, seed=5)
    color = list(frame["color"])
    color[10] = ""  # missing
    color[20] = "purple"  # not seen in training (the encoder ignores it)
    return {"site": [f"s{k % 3}" for k in range(N)],
            "temp": [f"{v:.4f}" for v in frame["temp"]],
            "color": color,
            "pressure": [f"{v:.5f}" for v in frame["pressure"]],
            "note": [f"n{k}" for k in range(N)]}


def _model_data(cols: dict[str, list[Any]], inputs: tuple[str, ...],
                text: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """The whole file as one predict request: empty cells are missing values."""
    out: dict[str, list[Any]] = {}
    for name in inputs:
        if name in text:
            out[name] = [v if v else None for v in cols[name]]
        else:
            out[name] = [math.nan if v == "" else float(v) for v in cols[name]]
    return out


def _expected(agent: Any, data: dict[str, list[Any]]) -> tuple[list[str], np.ndarray | None,
                                                              np.ndarray | None]:
    """Labels, probabilities and values for the whole file in one request."""
    r = agent.predict(data)
    probs = None if r.probabilities is None else r.probabilities.astype(np.float64)
    values = None if r.values is None else r.values.astype(np.float64)
    return [str(x) for x in r.labels], probs, values


def _to_parquet(path: Path, cols: dict[str, Any], row_group_size: int | None = None) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


def _floats(values: list[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


# --- chunking: the same predictions as the whole file at once -----------------------------------


def test_multi_chunk_csv_matches_whole_file(tmp_path: Path, make_agent: Any, small_bundle: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """52 rows in chunks of 7 (the last one 3): every row's label and probabilities equal the
    whole file predicted in one request, in the file's order, pass-through column kept."""
    from edge_agent.batch import score_file

    agent = make_agent(small_bundle)
    cols = _matrix_file_columns()
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    _write_csv(src, cols)
    labels, probs, _ = _expected(agent, _model_data(cols, tuple(f"f{i}" for i in range(6))))
    assert probs is not None
    sizes = _spy_chunks(agent, monkeypatch)

    assert score_file(agent, src, out, chunk_rows=CHUNK) == N
    assert sizes == [CHUNK] * 7 + [3]
    header, got = _read_csv(out)
    assert header == ["row_id", "prediction_id", "label", "p_0", "p_1"]
    assert got["row_id"] == cols["row_id"]
    assert got["label"] == labels
    np.testing.assert_array_equal(_floats(got["p_0"]), probs[:, 0])
    np.testing.assert_array_equal(_floats(got["p_1"]), probs[:, 1])
    assert math.isnan(float(got["p_0"][3]))  # the empty f0 cell was served as missing
    assert len(set(got["prediction_id"])) == N


def test_multi_chunk_named_columns_csv(tmp_path: Path, make_agent: Any, columns_bundle: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A named-columns bundle (text and numbers, columns in another order than the model's,
    two pass-throughs either side) in chunks: the same as the whole file at once."""
    from edge_agent.batch import score_file

    agent = make_agent(columns_bundle)
    cols = _sensor_file_columns()
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    _write_csv(src, cols)
    labels, probs, _ = _expected(agent, _model_data(cols, ("temp", "pressure", "color"),
                                                    text=("color",)))
    assert probs is not None
    sizes = _spy_chunks(agent, monkeypatch)

    assert score_file(agent, src, out, chunk_rows=CHUNK) == N
    assert sizes == [CHUNK] * 7 + [3]
    header, got = _read_csv(out)
    lbls = columns_bundle.manifest.labels
    assert header == ["site", "note", "prediction_id", "label", *(f"p_{x}" for x in lbls)]
    assert got["site"] == cols["site"] and got["note"] == cols["note"]
    assert got["label"] == labels
    for k, x in enumerate(lbls):
        np.testing.assert_array_equal(_floats(got[f"p_{x}"]), probs[:, k])


@pytest.mark.parametrize("row_group_size", [None, 20])
def test_multi_chunk_parquet_to_csv(tmp_path: Path, make_agent: Any, small_bundle: Any,
                                    monkeypatch: pytest.MonkeyPatch,
                                    row_group_size: int | None) -> None:
    """Parquet in (one row group, or row groups of 20 that chunks do not straddle), CSV out:
    the same predictions as the whole file at once, in order."""
    from edge_agent.batch import score_file

    agent = make_agent(small_bundle)
    X, _ = make_classification_data(n=600, d=6, seed=11)
    X = X[400:400 + N].astype(np.float64)
    X[5, 2] = np.nan
    table: dict[str, Any] = {"row_id": list(range(1000, 1000 + N))}
    table.update({f"f{i}": X[:, i] for i in range(6)})
    src, out = tmp_path / "in.parquet", tmp_path / "out.csv"
    _to_parquet(src, table, row_group_size)
    labels, probs, _ = _expected(agent, {f"f{i}": X[:, i].tolist() for i in range(6)})
    assert probs is not None
    sizes = _spy_chunks(agent, monkeypatch)

    assert score_file(agent, src, out, chunk_rows=CHUNK) == N
    assert sum(sizes) == N and max(sizes) == CHUNK and len(sizes) > 1
    if row_group_size is None:
        assert sizes == [CHUNK] * 7 + [3]
    header, got = _read_csv(out)
    assert header == ["row_id", "prediction_id", "label", "p_0", "p_1"]
    assert got["row_id"] == [str(k) for k in range(1000, 1000 + N)]
    assert got["label"] == labels
    np.testing.assert_array_equal(_floats(got["p_0"]), probs[:, 0])
    np.testing.assert_array_equal(_floats(got["p_1"]), probs[:, 1])


# --- Parquet output ----------------------------------------------------------------------------


def test_csv_to_parquet_output(tmp_path: Path, make_agent: Any, small_bundle: Any) -> None:
    """`-o out.parquet` from a CSV writes a real Parquet file, one row group per chunk, with the
    pass-through as text and the predictions typed."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from edge_agent.batch import score_file

    agent = make_agent(small_bundle)
    cols = _matrix_file_columns()
    src, out = tmp_path / "in.csv", tmp_path / "out.parquet"
    _write_csv(src, cols)
    labels, probs, _ = _expected(agent, _model_data(cols, tuple(f"f{i}" for i in range(6))))
    assert probs is not None

    assert score_file(agent, src, out, chunk_rows=CHUNK) == N
    assert out.read_bytes()[:4] == b"PAR1"
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == N
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [CHUNK] * 7 + [3]
    table = pq.read_table(out)
    assert table.schema == pa.schema([("row_id", pa.string()), ("prediction_id", pa.string()),
                                      ("label", pa.string()), ("p_0", pa.float64()),
                                      ("p_1", pa.float64())])
    got = table.to_pydict()
    assert got["row_id"] == cols["row_id"]
    assert got["label"] == labels
    np.testing.assert_array_equal(_floats(got["p_0"]), probs[:, 0])
    np.testing.assert_array_equal(_floats(got["p_1"]), probs[:, 1])
    assert len(set(got["prediction_id"])) == N


def test_parquet_to_parquet_regressor(tmp_path: Path, make_agent: Any,
                                      regressor_bundle: Any) -> None:
    """Parquet to Parquet: pass-through columns keep their types (int, timestamp, text with
    nulls); a regressor's output is a float64 `value` column equal to the whole file's."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from edge_agent.batch import score_file

    agent = make_agent(regressor_bundle)
    X, _ = make_regression_data(n=450, d=4, seed=7)
    X = X[300:300 + N].astype(np.float64)
    t0 = datetime(2024, 5, 1, 12, 0)
    table: dict[str, Any] = {
        "id": pa.array(range(N), type=pa.int64()),
        "at": pa.array([t0 + timedelta(seconds=k) for k in range(N)], type=pa.timestamp("us")),
        "tag": pa.array([None if k % 5 == 0 else f"t{k}" for k in range(N)], type=pa.string())}
    table.update({f"f{i}": X[:, i] for i in range(4)})
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    _to_parquet(src, table)
    _, _, values = _expected(agent, {f"f{i}": X[:, i].tolist() for i in range(4)})
    assert values is not None

    assert score_file(agent, src, out, chunk_rows=CHUNK) == N
    assert pq.ParquetFile(out).metadata.num_row_groups == 8
    result = pq.read_table(out)
    assert result.schema == pa.schema([("id", pa.int64()), ("at", pa.timestamp("us")),
                                       ("tag", pa.string()), ("prediction_id", pa.string()),
                                       ("value", pa.float64())])
    got = result.to_pydict()
    assert got["id"] == list(range(N))
    assert got["at"] == [t0 + timedelta(seconds=k) for k in range(N)]
    assert got["tag"] == table["tag"].to_pylist()
    np.testing.assert_array_equal(np.array(got["value"]), values)


def test_header_only_input(tmp_path: Path, make_agent: Any, small_bundle: Any) -> None:
    """A file with a header and no rows gives an output with the header and no rows, in either
    format."""
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from edge_agent.batch import score_file

    agent = make_agent(small_bundle)
    src = tmp_path / "in.csv"
    src.write_text("row_id,f0,f1,f2,f3,f4,f5\n")
    assert score_file(agent, src, tmp_path / "out.csv") == 0
    assert (tmp_path / "out.csv").read_text().splitlines() == ["row_id,prediction_id,label"]
    assert score_file(agent, src, tmp_path / "out.parquet") == 0
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 0 and table.column_names == ["row_id", "prediction_id", "label"]


# --- progress ----------------------------------------------------------------------------------


def _last_frame(text: str) -> str:
    """The bar as last drawn: frames start with a carriage return."""
    frames = [f for f in text.split("\r") if f.strip()]
    assert frames, f"no bar drawn: {text!r}"
    return frames[-1]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_progress_bar_reaches_the_total(tmp_path: Path, make_agent: Any, small_bundle: Any,
                                        suffix: str) -> None:
    """With the bar forced on (the stream is not a terminal), both inputs draw it, and its last
    frame is at 100% with every row counted; with it off, nothing is written."""
    from edge_agent.batch import score_file

    agent = make_agent(small_bundle)
    cols = _matrix_file_columns()
    src = tmp_path / f"in{suffix}"
    if suffix == ".csv":
        _write_csv(src, cols)
    else:
        _to_parquet(src, {f"f{i}": [float(v) if v else None for v in cols[f"f{i}"]]
                          for i in range(6)})
    stream = io.StringIO()
    assert score_file(agent, src, tmp_path / "out.csv", chunk_rows=CHUNK, progress=True,
                      progress_file=stream) == N
    text = stream.getvalue()
    last = _last_frame(text)
    assert f"scoring {src.name}" in last and "100%" in last
    assert (f"{N} rows" if suffix == ".csv" else f"{N}/{N}") in last
    assert text.endswith("\n")  # the bar's line is ended
    frames = [f for f in text.split("\r") if f.strip()]
    assert len(frames) >= 8  # the bar moved with each chunk, not only at the end
    if suffix == ".parquet":  # rows are known up front
        assert any(f"{CHUNK}/{N}" in f and "13%" in f for f in frames)
    else:  # bytes of the rows scored
        assert any(f"{CHUNK} rows" in f and "100%" not in f for f in frames)

    quiet = io.StringIO()
    score_file(agent, src, tmp_path / "out.csv", chunk_rows=CHUNK, progress_file=quiet)
    assert quiet.getvalue() == ""


def _write_config(tmp_path: Path, keypair: Any, bundle: Path) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "batch-test"\ndata_dir = "{tmp_path / "data"}"\n'
                   f'trusted_keys = ["{keypair.public_path}"]\nbundle = "{bundle}"\n'
                   "[http]\nport = 0\n")
    return cfg


def test_cli_bar_only_on_a_terminal(tmp_path: Path, keypair: Any, small_bundle: Any) -> None:
    """`edgefleet agent batch` draws the bar on stderr when stderr is a terminal (a pty here),
    and keeps stderr to the one summary line when it is not (a service's log)."""
    pytest.importorskip("pyarrow")
    src = tmp_path / "in.csv"
    _write_csv(src, _matrix_file_columns())
    cfg = _write_config(tmp_path, keypair, small_bundle.path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "edgefleet", "agent", "batch", str(src), "-c", str(cfg),
            "--chunk-rows", str(CHUNK), "-o"]

    piped = subprocess.run([*args, str(tmp_path / "piped.parquet")], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr.strip().splitlines() == [f"scored {N} rows -> {tmp_path}/piped.parquet"]
    assert "scoring" not in piped.stdout

    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([*args, str(tmp_path / "tty.parquet")], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        os.close(leader)
    assert proc.returncode == 0
    tty_text = b"".join(chunks).decode()
    assert "scoring in.csv" in tty_text and "100%" in tty_text and f"{N} rows" in tty_text
    assert b"scoring" not in stdout  # the bar is on stderr, not in the data on stdout


# --- bad files ---------------------------------------------------------------------------------


def _bad_matrix_csv(path: Path, kind: str) -> None:
    cols = _matrix_file_columns()
    if kind == "missing":
        del cols["f3"]
    elif kind == "text":
        cols["f2"][39] = "hot"  # file row 41, in the 6th chunk
    elif kind == "twice":  # a second "f1" column: which one the model should get is unclear
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([*cols, "f1"])
            w.writerows([*r, "0.5"] for r in zip(*cols.values(), strict=True))
        return
    _write_csv(path, cols)
    if kind == "ragged":
        lines = path.read_text().splitlines()
        lines[30] += ",extra"  # file row 31
        path.write_text("\n".join(lines) + "\n")


BAD_CASES = {
    "missing": ("in.csv", "has no column 'f3'"),
    "text": ("in.csv", "row 41, column 'f2' = 'hot': expected a number"),
    "ragged": ("in.csv", "row 31 has 8 fields; the header has 7"),
    "twice": ("in.csv", "has column 'f1' 2 times"),
    "parquet-text": ("in.parquet", "row 40, column 'f2' = 'hot': expected a number"),
}


@pytest.mark.parametrize("out_suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_input_names_row_and_column_and_writes_nothing(
        tmp_path: Path, make_agent: Any, small_bundle: Any, kind: str, out_suffix: str) -> None:
    """A bad file (a model column missing or given twice, a text cell in a numeric column of a
    CSV or Parquet file, a row with too many fields) fails with one error naming the file and
    where; a new output is not created and an existing one is left as it was (no temp left)."""
    from edge_agent.batch import score_file

    if out_suffix == ".parquet" or kind.startswith("parquet"):
        pytest.importorskip("pyarrow")
    agent = make_agent(small_bundle)
    name, message = BAD_CASES[kind]
    src = tmp_path / "in" / name
    src.parent.mkdir()
    if kind == "parquet-text":
        cols = _matrix_file_columns()
        table: dict[str, Any] = {f"f{i}": cols[f"f{i}"] for i in range(6)}  # text columns
        table["f2"][39] = "hot"
        _to_parquet(src, table)
    else:
        _bad_matrix_csv(src, kind)
    outdir = tmp_path / "out"
    outdir.mkdir()

    fresh = outdir / f"fresh{out_suffix}"
    with pytest.raises(InputError) as err:
        score_file(agent, src, fresh, chunk_rows=CHUNK)
    assert message in str(err.value) and str(src) in str(err.value)
    assert list(outdir.iterdir()) == []

    existing = outdir / f"existing{out_suffix}"
    existing.write_bytes(b"previous results\n")
    with pytest.raises(InputError) as again:
        score_file(agent, src, existing, chunk_rows=CHUNK)
    assert str(again.value) == str(err.value)
    assert existing.read_bytes() == b"previous results\n"
    assert list(outdir.iterdir()) == [existing]


def test_text_feature_given_numbers_in_parquet(tmp_path: Path, make_agent: Any,
                                               columns_bundle: Any) -> None:
    """A Parquet file whose text feature holds numbers is refused, naming row and column, as the
    HTTP API refuses them (a CSV cell is always text)."""
    from edge_agent.batch import score_file

    agent = make_agent(columns_bundle)
    cols = _sensor_file_columns()
    table = {"temp": [float(v) for v in cols["temp"]],
             "pressure": [float(v) for v in cols["pressure"]],
             "color": [float(k) for k in range(N)]}
    src, out = tmp_path / "in.parquet", tmp_path / "out.csv"
    _to_parquet(src, table)
    with pytest.raises(InputError, match=r"row 1, column 'color' = 0\.0: expected text"):
        score_file(agent, src, out, chunk_rows=CHUNK)
    assert not out.exists()


# --- without pyarrow ---------------------------------------------------------------------------


def test_parquet_output_without_pyarrow(tmp_path: Path, make_agent: Any, small_bundle: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`-o out.parquet` without pyarrow: a clear error naming the file and the fix, before
    anything is read or written; CSV output still works, Parquet input says the same."""
    from edge_agent.batch import score_file

    agent = make_agent(small_bundle)
    src = tmp_path / "in.csv"
    _write_csv(src, _matrix_file_columns())
    out = tmp_path / "out.parquet"
    existing = tmp_path / "old.parquet"
    existing.write_bytes(b"old")
    for mod in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import pyarrow` raises ImportError

    with pytest.raises(InputError) as err:
        score_file(agent, src, out, chunk_rows=CHUNK)
    assert str(err.value) == f"{out}: writing Parquet needs pyarrow (pip install pyarrow)"
    assert not out.exists()
    with pytest.raises(InputError, match="pip install pyarrow"):
        score_file(agent, src, existing, chunk_rows=CHUNK)
    assert existing.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["in.csv", "old.parquet"]

    assert score_file(agent, src, tmp_path / "out.csv", chunk_rows=CHUNK) == N
    pq_in = tmp_path / "in.parquet"
    pq_in.write_bytes(b"PAR1")
    with pytest.raises(InputError, match=r"in\.parquet: reading Parquet needs pyarrow"):
        score_file(agent, pq_in, tmp_path / "out2.csv")


# --- line ends, where a row starts, one-column files, column names ------------------------------


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("read_bytes", [7, 64, 1 << 16])
def test_every_line_end_reads_the_same_rows(tmp_path: Path, make_agent: Any, small_bundle: Any,
                                            monkeypatch: pytest.MonkeyPatch, end: bytes,
                                            read_bytes: int) -> None:
    """LF, CRLF and bare CR (old Mac exports) give the same output, also when a CRLF is split
    between two reads; the progress count still reaches the file's size."""
    from edge_agent import batch

    monkeypatch.setattr(batch, "_READ_BYTES", read_bytes)
    agent = make_agent(small_bundle)
    cols = _matrix_file_columns()
    plain = tmp_path / "plain.csv"
    _write_csv(plain, cols)
    lines = plain.read_bytes().replace(b"\r\n", b"\n").splitlines()
    src = tmp_path / "in.csv"
    src.write_bytes(end.join(lines) + end)
    out = tmp_path / "out.csv"
    stream = io.StringIO()
    assert batch.score_file(agent, src, out, chunk_rows=CHUNK, progress=True,
                            progress_file=stream) == N
    _, got = _read_csv(out)
    assert got["row_id"] == cols["row_id"]
    assert math.isnan(float(got["p_0"][3]))
    frames = [f for f in stream.getvalue().split("\r") if f.strip()]
    assert "100%" in frames[-1] and f"{N} rows" in frames[-1]
    assert any(f"{CHUNK} rows" in f and "100%" not in f for f in frames)  # moved per chunk


def test_an_error_names_the_line_where_a_multi_line_record_starts(
        tmp_path: Path, make_agent: Any, small_bundle: Any) -> None:
    from edge_agent.batch import score_file

    agent = make_agent(small_bundle)
    src = tmp_path / "in.csv"
    src.write_text('row_id,f0,f1,f2,f3,f4,f5\n"a\nb\nc",1,2,3,4,5,6\nr2,1,2,x,4,5,6\n')
    with pytest.raises(InputError, match=r"row 5, column 'f2' = 'x'"):
        score_file(agent, src, tmp_path / "out.csv", chunk_rows=CHUNK)
    src.write_text('row_id,f0,f1,f2,f3,f4,f5\n"a\nb\nc",1,2,x,4,5,6\n')
    with pytest.raises(InputError, match=r"row 2, column 'f2' = 'x'"):
        score_file(agent, src, tmp_path / "out.csv", chunk_rows=CHUNK)


def test_a_blank_line_in_a_one_column_file_is_a_missing_value(
        tmp_path: Path, make_agent: Any, compile_fast: Any) -> None:
    from sklearn.linear_model import LogisticRegression

    from edge_agent.batch import score_file

    X, y = make_classification_data(n=600, d=6, seed=11)
    one = compile_fast(LogisticRegression().fit(X[:400, :1], y[:400]), X[:, :1], y,
                       name="one", version="1.0.0")
    agent = make_agent(one)
    feature = agent.serving().validator.names[0]
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    src.write_text(f"{feature}\n0.5\n\n-1.5\n")
    assert score_file(agent, src, out, chunk_rows=CHUNK) == 3
    _, got = _read_csv(out)
    expected = agent.predict({feature: [0.5, math.nan, -1.5]})
    np.testing.assert_array_equal(_floats(got["p_0"]),
                                  expected.probabilities[:, 0].astype(np.float64))


def test_passed_through_columns_never_share_a_name_with_the_results(
        tmp_path: Path, make_agent: Any, small_bundle: Any) -> None:
    """A file scored again, or one with its ground truth in ``label``: those columns come out
    as input_<name>, next to the new results."""
    from edge_agent.batch import score_file

    agent = make_agent(small_bundle)
    cols = _matrix_file_columns()
    cols = {"label": ["truth"] * N, "prediction_id": ["old"] * N, "p_0": ["x"] * N,
            "input_label": ["y"] * N, **cols}
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    _write_csv(src, cols)
    score_file(agent, src, out, chunk_rows=CHUNK)
    header, got = _read_csv(out)
    assert header == ["input_label", "input_prediction_id", "input_p_0", "input_input_label",
                      "row_id", "prediction_id", "label", "p_0", "p_1"]
    assert len(set(header)) == len(header)
    assert got["input_label"] == ["truth"] * N and got["input_input_label"] == ["y"] * N
    assert got["prediction_id"] != ["old"] * N
