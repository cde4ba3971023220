"""Batch scoring of files: stream a CSV or Parquet file through the agent in chunks.

Memory stays bounded by the chunk size whatever the file size: a CSV is read a chunk of rows at
a time, a Parquet file a record batch at a time, and a Parquet output gets one row group per
chunk (``pyarrow.parquet.ParquetWriter``). Input and output formats are independent; each
follows its file's suffix: ``.parquet`` / ``.pq`` is Parquet (which needs pyarrow), anything
else CSV.

Columns that are not model inputs (ids, timestamps, labels) pass through to the output
unchanged (Parquet to Parquet keeps their types; from a CSV they are text), as
``input_<name>`` when the results use the name (``prediction_id``, ``label``, ``value``,
``p_<label>``); empty cells and nulls are missing values. Errors name the file, the row and
the column: a CSV row is the line in the file where it starts (the header is row 1), a Parquet
row counts from 1. CSV lines may end in \\n, \\r\\n or a bare \\r.

The output is written to a temp file in its folder and renamed over the target once complete
(:func:`edge_agent.atomic.atomic_write`): a failed run leaves no partial file, and an existing
output file untouched.

With ``progress`` on, a bar (on stderr unless told otherwise) shows rows done against the
file's row count for Parquet, and bytes read against the file size for a CSV.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TextIO, cast

import click
import numpy as np

from edge_agent.agent import Agent, PredictResult
from edge_agent.atomic import atomic_write
from edge_agent.errors import InputError
from edge_agent.validation import InputValidator

__all__ = ["PARQUET_SUFFIXES", "score_file"]

#: file suffixes read and written as Parquet (case-insensitive); anything else is CSV
PARQUET_SUFFIXES = (".parquet", ".pq")
_READ_BYTES = 1 << 16
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def _pyarrow(why: str) -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet), or InputError(why) when pyarrow is not installed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise InputError(why) from err
    return pa, pq


# --- input -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Chunk:
    """Some rows of the input, column by column."""

    columns: list[Sequence[Any]]  # one sequence of values per input column (Python values)
    rows: Sequence[int]  # each row's number in the file, for error messages
    arrow: Any = None  # the pyarrow RecordBatch they came from (Parquet input)

    @property
    def n(self) -> int:
        return len(self.rows)


Advance = Callable[[int, int], None]  # (steps of the bar, rows done so far)


class _CsvInput:
    """A CSV file with a header row; the bar counts the bytes of the rows scored so far.

    Lines are read as bytes and decoded one by one (rather than through a TextIOWrapper, which
    reads ahead): the bytes consumed are exactly those of the rows handed out, and a line that
    is not UTF-8 is named.
    """

    arrow_schema: Any = None

    def __init__(self, path: Path, stack: contextlib.ExitStack[Any]) -> None:
        self.path = path
        self._raw = stack.enter_context(path.open("rb"))
        self.total = os.fstat(self._raw.fileno()).st_size
        self._consumed = 0
        self._reader = csv.reader(self._lines())
        header = self._next()
        if header is None:
            raise InputError(f"{path} is empty; expected a header row")
        self.header = header

    def _lines(self) -> Iterator[str]:
        """The file's lines with their ends, which may be \\n, \\r\\n or a bare \\r (old
        Mac and "CSV (Macintosh)" exports), as the csv module reads them."""
        number = 0
        pending = b""
        while True:
            block = self._raw.read(_READ_BYTES)
            data = pending + block
            start = 0
            for m in _LINE_END.finditer(data):
                if block and m.end() == len(data) and data.endswith(b"\r"):
                    break  # a \r at the end of what was read: a \n may follow it
                number += 1
                self._consumed += m.end() - start
                yield self._decode(data[start:m.end()], number)
                start = m.end()
            pending = data[start:]
            if not block:
                if pending:
                    self._consumed += len(pending)
                    yield self._decode(pending, number + 1)
                return

    def _decode(self, line: bytes, number: int) -> str:
        try:
            # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of a name
            return line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{self.path}: row {number} is not UTF-8 text "
                             f"({err.reason})") from None

    def _next(self) -> list[str] | None:
        try:
            return next(self._reader, None)
        except csv.Error as err:
            raise InputError(f"{self.path}: row {self._reader.line_num}: {err}") from None

    def chunks(self, size: int, advance: Advance) -> Iterator[_Chunk]:
        width = len(self.header)
        rows: list[list[str]] = []
        numbers: list[int] = []
        done = last = 0
        while True:
            line = self._reader.line_num + 1  # where the record starts (it may span lines)
            row = self._next()
            if row is None:
                break
            if not row:
                if width != 1:
                    continue  # a blank line
                row = [""]  # in a one-column file, an empty cell: a missing value
            if len(row) != width:
                raise InputError(f"{self.path}: row {line} has {len(row)} fields; the header "
                                 f"has {width}")
            rows.append(row)
            numbers.append(line)
            if len(rows) >= size:
                yield _Chunk(list(zip(*rows, strict=True)), numbers)
                done += len(rows)
                rows, numbers = [], []
                pos = min(self._consumed, self.total)
                advance(pos - last, done)
                last = pos
        if rows:
            yield _Chunk(list(zip(*rows, strict=True)), numbers)
            done += len(rows)
        advance(max(0, self.total - last), done)


class _ParquetInput:
    """A Parquet file, read a record batch at a time; the bar counts rows."""

    def __init__(self, path: Path, stack: contextlib.ExitStack[Any]) -> None:
        pa, pq = _pyarrow(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)")
        self.path = path
        self._errors = (OSError, pa.ArrowException)
        try:
            self._file = pq.ParquetFile(path)
        except self._errors as err:
            raise InputError(f"{path} is not a readable Parquet file: {err}") from None
        stack.callback(self._file.close)
        self.arrow_schema = self._file.schema_arrow
        self.header = list(self.arrow_schema.names)
        self.total = int(self._file.metadata.num_rows)

    def chunks(self, size: int, advance: Advance) -> Iterator[_Chunk]:
        batches = self._file.iter_batches(batch_size=size)
        done = 0
        while True:
            try:
                batch = next(batches, None)
            except self._errors as err:
                raise InputError(f"{self.path}: cannot read the rows after row {done}: "
                                 f"{err}") from None
            if batch is None:
                return
            columns = [batch.column(j).to_pylist() for j in range(batch.num_columns)]
            yield _Chunk(columns, range(done + 1, done + 1 + batch.num_rows), batch)
            done += batch.num_rows
            advance(batch.num_rows, done)


# --- model input -------------------------------------------------------------------------------


def _passthrough(validator: InputValidator, path: Path, header: list[str]) -> list[int]:
    """Check the header against the model's inputs; the indexes of the other columns."""
    if validator.signal:
        if len(header) != validator.width:
            raise InputError(f"{path} has {len(header)} columns; this model takes "
                             f"{validator.describe()}")
        return []
    absent = [n for n in validator.names if n not in header]
    if absent:
        raise InputError(f"{path} has no column {absent[0]!r}; the model takes "
                         f"{list(validator.names)}")
    twice = [n for n in validator.names if header.count(n) > 1]
    if twice:
        raise InputError(f"{path} has column {twice[0]!r} {header.count(twice[0])} times; "
                         "expected once")
    inputs = set(validator.names)
    return [j for j, h in enumerate(header) if h not in inputs]


def _output_names(columns: list[str], labels: Sequence[str]) -> list[str]:
    """Names of the passed-through columns in the output: ``input_<name>`` for one the
    results are written under (a file scored twice, or ground truth in a ``label`` column),
    so no output has two columns of one name."""
    taken = {"prediction_id", "label", "value", *(f"p_{lbl}" for lbl in labels)}
    out = []
    for name in columns:
        while name in taken:
            name = f"input_{name}"
        taken.add(name)
        out.append(name)
    return out


def _numbers(values: Sequence[Any], column: str, rows: Sequence[int], path: Path) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None or v == "":
            out[i] = math.nan
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"{path}: row {rows[i]}, column {column!r} = {v!r:.40}: expected "
                             "a number or an empty cell") from None
    return out


def _texts(values: Sequence[Any], column: str, rows: Sequence[int], path: Path) -> list[Any]:
    out: list[Any] = []
    for i, v in enumerate(values):
        if v is None or v == "":
            out.append(None)
        elif isinstance(v, str):
            out.append(v)
        else:  # only from Parquet: a CSV cell is always text
            raise InputError(f"{path}: row {rows[i]}, column {column!r} = {v!r:.40}: expected "
                             "text or an empty cell")
    return out


def _model_input(validator: InputValidator, path: Path, header: list[str],
                 chunk: _Chunk) -> Any:
    if validator.signal:
        return np.column_stack([_numbers(col, header[j], chunk.rows, path)
                                for j, col in enumerate(chunk.columns)])
    index = {h: j for j, h in enumerate(header)}
    data: dict[str, Any] = {}
    for spec in validator.specs:
        col = chunk.columns[index[spec.name]]
        if spec.dtype == "string":
            data[spec.name] = _texts(col, spec.name, chunk.rows, path)
        else:
            data[spec.name] = _numbers(col, spec.name, chunk.rows, path)
    return data


# --- output ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Column:
    name: str
    text: bool  # text (str) values, else float64
    values: Sequence[Any] | np.ndarray


def _result_columns(result: PredictResult, labels: tuple[str, ...]) -> list[_Column]:
    ids = _Column("prediction_id", True, result.ids)
    if result.probabilities is not None:
        probs = result.probabilities.astype(np.float64)
        return [ids, _Column("label", True, [str(x) for x in result.labels]),
                *(_Column(f"p_{lbl}", False, probs[:, k]) for k, lbl in enumerate(labels))]
    if result.values is not None:
        return [ids, _Column("value", False, result.values.astype(np.float64))]
    return [ids, _Column("label", True, [str(x) for x in result.labels])]


def _empty_result_columns(task: str) -> list[_Column]:
    """The columns written when the input has no rows (no result to read them from)."""
    return [_Column("prediction_id", True, []),
            _Column("value" if task == "regression" else "label", task != "regression", [])]


class _CsvOutput:
    def __init__(self, fh: BinaryIO) -> None:
        self._text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        self._writer = csv.writer(self._text)

    def start(self, passthrough: list[tuple[str, Any]], results: list[_Column]) -> None:
        self._writer.writerow([name for name, _ in passthrough] + [c.name for c in results])

    def write(self, chunk: _Chunk, keep: list[int], results: list[_Column]) -> None:
        values = [v.tolist() if isinstance(v, np.ndarray) else v
                  for v in (c.values for c in results)]
        self._writer.writerows(zip(*(chunk.columns[j] for j in keep), *values, strict=True))

    def close(self) -> None:
        self._text.flush()
        self._text.detach()  # the file is atomic_write's to close

    def abort(self) -> None:
        with contextlib.suppress(ValueError):
            self._text.detach()


class _ParquetOutput:
    def __init__(self, fh: BinaryIO, pa: Any, pq: Any) -> None:
        self._fh, self._pa, self._pq = fh, pa, pq
        self._writer: Any = None
        self._schema: Any = None

    def start(self, passthrough: list[tuple[str, Any]], results: list[_Column]) -> None:
        pa = self._pa
        fields = [pa.field(name, pa.string() if typ is None else typ)
                  for name, typ in passthrough]
        fields += [pa.field(c.name, pa.string() if c.text else pa.float64()) for c in results]
        self._schema = pa.schema(fields)
        self._writer = self._pq.ParquetWriter(self._fh, self._schema)

    def write(self, chunk: _Chunk, keep: list[int], results: list[_Column]) -> None:
        pa = self._pa
        arrays = [chunk.arrow.column(j) if chunk.arrow is not None
                  else pa.array(chunk.columns[j], type=pa.string()) for j in keep]
        arrays += [pa.array(c.values, type=pa.string() if c.text else pa.float64())
                   for c in results]
        batch = pa.record_batch(arrays, schema=self._schema)
        self._writer.write_batch(batch, row_group_size=max(1, chunk.n))  # one group per chunk

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # the footer; the file is atomic_write's to close

    def abort(self) -> None:
        # closed before atomic_write drops the temp file: left open, the writer would write its
        # footer into a closed file when collected
        with contextlib.suppress(Exception):
            self.close()


# --- progress ----------------------------------------------------------------------------------


class _Bar(Protocol):
    def update(self, n_steps: int, current_item: Any = None) -> None: ...


class _NoBar:
    def update(self, n_steps: int, current_item: Any = None) -> None:
        return None


class _TerminalView:
    """A stream that says it is a terminal: click only draws its bar on one, and the caller
    asked for the bar (the CLI asks when stderr is a terminal)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        return self._stream.write(s)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return True


def _progress_bar(on: bool, stream: TextIO | None, total: int, label: str,
                  counts_rows: bool) -> contextlib.AbstractContextManager[_Bar]:
    if not on:
        return contextlib.nullcontext(_NoBar())
    view = cast(TextIO, _TerminalView(stream if stream is not None else sys.stderr))
    if counts_rows:
        return click.progressbar(length=total, label=label, file=view, show_pos=True,
                                 show_percent=True)
    return click.progressbar(length=total, label=label, file=view, show_percent=True,
                             item_show_func=lambda done: None if done is None else f"{done} rows")


# --- the whole file ----------------------------------------------------------------------------


def score_file(agent: Agent, input_file: Path, output_file: Path, *, chunk_rows: int = 4096,
               progress: bool = False, progress_file: TextIO | None = None) -> int:
    """Score every row of ``input_file`` into ``output_file``; returns the number of rows.

    ``progress`` draws a bar on ``progress_file`` (default stderr) whether or not it is a
    terminal: the caller decides (the CLI: only when stderr is one, so a service's logs stay
    clean). InputError for a bad file, naming the row and column where there is one; nothing
    is written then, and an existing ``output_file`` stays as it was.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows = {chunk_rows}; expected at least 1")
    # checked first: without pyarrow, nothing is read or written
    arrow = (_pyarrow(f"{output_file}: writing Parquet needs pyarrow (pip install pyarrow)")
             if _is_parquet(output_file) else None)
    loaded = agent.serving()
    validator = loaded.validator
    manifest = loaded.bundle.manifest
    written = 0
    with contextlib.ExitStack() as stack:
        source: _CsvInput | _ParquetInput = (
            _ParquetInput(input_file, stack) if _is_parquet(input_file)
            else _CsvInput(input_file, stack))
        header = source.header
        keep = _passthrough(validator, input_file, header)
        names = _output_names([header[j] for j in keep], manifest.labels)
        passthrough = [(name, None if source.arrow_schema is None
                        else source.arrow_schema.field(j).type)
                       for name, j in zip(names, keep, strict=True)]
        bar = stack.enter_context(_progress_bar(
            progress, progress_file, source.total, f"scoring {input_file.name}",
            counts_rows=isinstance(source, _ParquetInput)))
        fh = stack.enter_context(atomic_write(output_file))
        sink = _CsvOutput(fh) if arrow is None else _ParquetOutput(fh, *arrow)
        try:
            for chunk in source.chunks(chunk_rows, bar.update):
                result = agent.predict(_model_input(validator, input_file, header, chunk))
                results = _result_columns(result, manifest.labels)
                if written == 0:
                    sink.start(passthrough, results)
                sink.write(chunk, keep, results)
                written += chunk.n
            if written == 0:
                sink.start(passthrough, _empty_result_columns(manifest.task))
            sink.close()
        except BaseException:
            sink.abort()
            raise
    return written
