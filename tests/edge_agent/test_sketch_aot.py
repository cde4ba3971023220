"""The sketch kernel built ahead of time: the JIT's bits, the GIL released, no numba in the
agent that loads it, and `agent warmup` building it (or saying why not)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import sketch_aot, sketch_kernels, sketching
from edge_agent.sketching import KernelLayout, _kernel_args
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout
from tests.edge_agent.test_deferred_batches import decode_with, deferred_stages
from tests.edge_agent.test_sketching import cases, float32_cases

SETTINGS = settings(deadline=None, max_examples=200)
ROOT = Path(__file__).resolve().parents[2]
STALE = "edgefleet_sketch_000000000000000000000000.so"


@dataclass(frozen=True)
class Built:
    cache_dir: Path
    result: sketch_aot.BuildResult
    kernel: sketch_aot.AotKernel
    #: the root logger's level after the build, which set it to INFO before
    root_level_after: int


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """One build for the module, next to a stale one. A failed build fails the tests: CI has a
    C compiler and the Python headers (scripts/setup installs them)."""
    cache_dir = tmp_path_factory.mktemp("numba-cache")
    (cache_dir / "aot").mkdir()
    (cache_dir / "aot" / STALE).write_bytes(b"an older build")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # as `edgefleet -v` sets it
    try:
        result = sketch_aot.build(cache_dir)
        level_after = root.level
    finally:
        root.setLevel(level)
    assert result.error is None, f"the ahead-of-time build failed here: {result.error}"
    kernel = sketch_aot.load(cache_dir)
    assert kernel is not None
    return Built(cache_dir, result, kernel, level_after)


def _fold_both(built: Built, layout: SketchLayout, values: np.ndarray,
               ends: np.ndarray) -> None:
    """Fold twice (the second merges into stored moments) through the build and the JIT:
    the same result and the same bytes of counts, missing and moments."""
    kl = KernelLayout.from_layout(layout)
    values = np.ascontiguousarray(values)  # as sketching._checked_values passes them
    aot, jit = Sketch.empty(layout), Sketch.empty(layout)
    for _ in range(2):
        a = built.kernel.fold(_kernel_args(aot, kl, values, ends))
        assert a is not None, "the build declined the arrays the agent passes"
        j = sketch_kernels._update_segments_kernel(*_kernel_args(jit, kl, values, ends))
        assert a == tuple(j)
    assert aot.counts.tobytes() == jit.counts.tobytes()
    assert aot.missing.tobytes() == jit.missing.tobytes()
    assert aot.moments.tobytes() == jit.moments.tobytes()


@st.composite
def segmented(draw: st.DrawFn) -> tuple[SketchLayout, np.ndarray, np.ndarray]:
    """test_sketching's cases as one array of segments, float32 or float64, sometimes with an
    invalid code in a categorical column."""
    case = draw(cases())
    values = np.concatenate(case.batches)
    ends = np.cumsum([len(b) for b in case.batches]).astype(np.int64)
    categorical = [j for j, f in enumerate(case.layout.features) if f.kind == "categorical"]
    if categorical and len(values) and draw(st.booleans()):
        i = draw(st.integers(0, len(values) - 1))
        values[i, draw(st.sampled_from(categorical))] = draw(
            st.sampled_from([1.5, 99.0, -2.0, np.inf]))
    with np.errstate(over="ignore"):
        values = np.ascontiguousarray(values, dtype=draw(st.sampled_from([np.float32,
                                                                           np.float64])))
    return case.layout, values, ends


@SETTINGS
@given(case=segmented())
def test_build_folds_the_bits_of_the_jit(built: Built,
                                          case: tuple[SketchLayout, np.ndarray, np.ndarray]
                                          ) -> None:
    """Random layouts and segmented batches, float32 and float64, bad codes included: the
    build returns what the JIT returns and writes the same bytes."""
    _fold_both(built, *case)


@SETTINGS
@given(case=float32_cases(), wide=st.booleans())
def test_build_folds_the_bits_of_the_jit_near_edges(
        built: Built, case: tuple[SketchLayout, np.ndarray], wide: bool) -> None:
    """Values at and next to edges float32 cannot hold, and edge lists long enough for the
    bisection path: the same bytes as the JIT."""
    layout, values = case
    if wide:
        values = values.astype(np.float64)
    _fold_both(built, layout, values, np.array([len(values)], dtype=np.int64))


def test_build_declines_arrays_it_was_not_compiled_for(built: Built) -> None:
    """A read-only or strided sketch array, or int32 segment ends, is declined (None, nothing
    written) rather than read as another type: the caller folds those with the JIT."""
    layout = SketchLayout((FeatureLayout("x", "numeric", edges=(0.0, 1.0)),))
    kl = KernelLayout.from_layout(layout)
    values = np.array([[0.5], [2.0]])
    ends = np.array([2], dtype=np.int64)
    sketch = Sketch.empty(layout)
    sketch.counts.setflags(write=False)
    assert built.kernel.fold(_kernel_args(sketch, kl, values, ends)) is None
    sketch = Sketch.empty(layout)
    assert built.kernel.fold(_kernel_args(sketch, kl, values, ends.astype(np.int32))) is None
    assert built.kernel.fold(_kernel_args(sketch, kl, values.astype(np.int64), ends)) is None
    sketch.moments = np.tile(sketch.moments, (1, 2))[:, ::2]
    assert built.kernel.fold(_kernel_args(sketch, kl, values, ends)) is None
    assert sketch.counts.tolist() == [0, 0, 0]


@SETTINGS
@given(case=deferred_stages())
def test_build_decodes_the_bits_of_the_jit(built: Built, case: dict[str, Any]) -> None:
    """The deferred batches' decoder: the build writes what the JIT writes."""
    aot = decode_with(lambda *args: built.kernel.decode(args), case)
    jit = decode_with(sketch_kernels._decode_kernel, case)
    assert aot[0].item() is not None, "the build declined the arrays the telemetry passes"
    for a, j in zip(aot, jit, strict=True):
        assert a.tobytes() == j.tobytes()


def test_build_declines_decode_arrays_it_was_not_compiled_for(built: Built) -> None:
    """float64 probabilities, int32 ranges, read-only outputs: declined, nothing written."""
    raw, table = np.zeros(2, np.int64), np.array([1, 0, 1], np.int64)
    probs, ranges = np.ones((2, 2), np.float32), np.array([[0, 2]], np.int64)
    outputs, scores, codes = np.zeros((2, 2)), np.zeros(2, np.float32), np.zeros(2, np.uint8)

    def decode(**changed: Any) -> int | None:
        args = {"raw": raw, "probabilities": probs, "table": table, "shift": -1,
                "ranges": ranges, "outputs": outputs, "log_scores": scores,
                "log_codes": codes, "code_bytes": 1, **changed}
        return built.kernel.decode(tuple(args.values()))

    read_only = np.zeros((2, 2))
    read_only.setflags(write=False)
    assert decode(probabilities=probs.astype(np.float64)) is None
    assert decode(ranges=ranges.astype(np.int32)) is None
    assert decode(outputs=read_only) is None
    assert decode(log_codes=np.zeros(4, np.uint8)[::2]) is None
    assert outputs.tolist() == [[0.0, 0.0]] * 2 and codes.tolist() == [0, 0]
    assert decode() == 0 and outputs.tolist() == [[0.0, 1.0]] * 2


def test_build_releases_the_gil(built: Built) -> None:
    """As the JIT's ``nogil=True``: another thread runs Python while a long fold runs (pycc's
    wrapper would hold the GIL for the whole call)."""
    layout = SketchLayout((FeatureLayout("x", "numeric", edges=tuple(np.linspace(-3, 3, 513))),))
    kl = KernelLayout.from_layout(layout)
    values = np.random.default_rng(0).standard_normal((2_000_000, 1)).astype(np.float32)
    args = _kernel_args(Sketch.empty(layout), kl, values, np.array([len(values)]))
    t0 = time.perf_counter()
    assert built.kernel.fold(args) == (-1, -1, -1)
    fold_s = time.perf_counter() - t0
    stalls = []
    for _ in range(3):
        go = threading.Event()

        def fold(go: threading.Event = go) -> None:
            go.wait()  # starts once this thread is timing
            built.kernel.fold(args)

        thread = threading.Thread(target=fold)
        thread.start()
        longest, last = 0.0, time.perf_counter()
        go.set()
        while thread.is_alive():
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        thread.join()
        stalls.append(longest)
    # held, the longest stall is the whole fold, every time
    assert min(stalls) < fold_s / 2, (stalls, fold_s)


def test_build_is_kept_and_replaces_older_builds(built: Built) -> None:
    """A second build finds the file and compiles nothing; the older build beside it was
    deleted; the file name is the key of this source, toolchain and machine."""
    assert built.result.built
    assert not (built.cache_dir / "aot" / STALE).exists()
    again = sketch_aot.build(built.cache_dir)
    assert again == sketch_aot.BuildResult(built.result.path, built=False, seconds=0.0)
    assert built.result.path.name == f"edgefleet_sketch_{sketch_aot.build_key()}.so"
    assert [p.name for p in (built.cache_dir / "aot").iterdir()] == [built.result.path.name]


def test_a_build_file_the_agent_would_refuse_is_built_again(
        built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """warmup does not take a file under the build's name for done when load() would refuse
    it (truncated, another machine's, writable by others): it builds again, and the agent then
    loads the build. (The compile itself is the module's build, copied: this is about when
    warmup compiles.)"""
    import shutil

    compiled: list[str] = []

    def fake_compile(name: str, out_dir: Path) -> None:
        compiled.append(name)
        shutil.copy2(built.result.path, out_dir / f"{name}.so")

    monkeypatch.setattr(sketch_aot, "_compile", fake_compile)
    path = sketch_aot.build_path(tmp_path)
    path.parent.mkdir(mode=0o755)
    path.write_bytes(b"\x7fELF truncated")
    with caplog.at_level(logging.WARNING, logger="edge_agent.sketch_aot"):
        result = sketch_aot.build(tmp_path)
    assert result.built and len(compiled) == 1 and "does not import" in caplog.text
    assert sketch_aot.load(tmp_path) is not None
    assert not sketch_aot.build(tmp_path).built and len(compiled) == 1  # now it is done
    path.chmod(0o666)
    assert sketch_aot.build(tmp_path).built and len(compiled) == 2
    assert path.stat().st_mode & 0o022 == 0 and sketch_aot.load(tmp_path) is not None


def test_missing_compiler_is_reported_not_raised(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a C compiler the build says which one is missing, before compiling anything,
    and writes nothing."""
    monkeypatch.setenv("CC", "/nonexistent/cc")
    result = sketch_aot.build(tmp_path)
    assert not result.built and result.seconds == 0.0
    assert result.error is not None and "'/nonexistent/cc'" in result.error
    assert "build-essential" in result.error
    assert not (tmp_path / "aot").exists()


def test_build_keeps_the_log_level(built: Built) -> None:
    """pycc turns distutils' logging down to WARN, and that logger is the root logger: the
    build puts it back, so `edgefleet -v agent warmup` still logs at INFO after a build."""
    assert built.root_level_after == logging.INFO


def test_every_missing_piece_of_the_toolchain_is_named(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A minimal install lacks several pieces at once: the error names each of them (here the
    Python headers and both compilers), not only the first, so one install fixes them all."""
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    paths = dict(sketch_aot.sysconfig.get_paths())
    monkeypatch.setattr(sketch_aot.sysconfig, "get_paths",
                        lambda: {**paths, "include": str(tmp_path)})
    problem = sketch_aot.toolchain_problem()
    assert problem is not None
    assert f"{tmp_path / 'Python.h'} is missing: apt-get install python3-dev" in problem
    assert "no C compiler ('/nonexistent/cc'" in problem
    assert "no C++ compiler ('/nonexistent/c++'" in problem
    monkeypatch.undo()
    assert sketch_aot.toolchain_problem() is None  # this machine has all of them


def test_build_that_does_not_import_leaves_the_jit(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A file under the build's name that does not import (truncated, another machine's) is
    logged once, and the folds use the JIT, with the same results."""
    path = sketch_aot.build_path(tmp_path)
    path.parent.mkdir()
    path.write_bytes(b"\x7fELF truncated")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    kernels = sketching._Kernels()
    with caplog.at_level(logging.INFO, logger="edge_agent.sketch_aot"):
        assert kernels.aot() is None
        assert kernels.aot() is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "does not import" in record.message
    layout = SketchLayout((FeatureLayout("x", "numeric", edges=(0.0, 1.0)),))
    sketch = Sketch.empty(layout)
    args = _kernel_args(sketch, KernelLayout.from_layout(layout), np.array([[0.5], [2.0]]),
                        np.array([2]))
    assert kernels.jit()(*args) == (-1, -1, -1)
    assert sketch.counts.tolist() == [0, 1, 1]


def test_agent_serves_and_folds_without_numba(built: Built, small_bundle: Any, keypair: Any,
                                              tmp_path: Path) -> None:
    """A bundle without preprocessing, with a build in the cache: the agent predicts, flushes
    (folding every row into the window's sketches) and closes with neither numba nor llvmlite
    imported (LLVM alone maps ~100 MiB)."""
    code = (
        "import json, logging, sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from edge_agent.agent import Agent\n"
        "from edge_agent.config import AgentConfig\n"
        "from edge_agent.telemetry import layouts_of\n"
        "from fleet_protocol.sketch import Sketch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "data, key, bundle = sys.argv[1:4]\n"
        "agent = Agent(AgentConfig(data_dir=Path(data), trusted_keys=(Path(key),),\n"
        "                          bundle=Path(bundle)))\n"
        "n = len(agent.serving().bundle.manifest.inputs)\n"
        "agent.predict(np.zeros((1, n), dtype=np.float32))\n"
        "agent.predict(np.ones((300, n), dtype=np.float32))\n"
        "agent.flush()\n"
        "in_layout, _ = layouts_of(agent.serving().bundle.manifest)\n"
        "(w,) = agent.store.windows()\n"
        "sk = Sketch.from_bytes(in_layout, w.inputs)\n"
        "agent.close()\n"
        "print(json.dumps({'folded': int(sk.feature_counts(0).sum() + sk.missing[0]),\n"
        "                  'modules': [m for m in ('numba', 'llvmlite') if m in sys.modules]}))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(built.cache_dir), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data"),
                          str(keypair.public_path), str(small_bundle.path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"folded": 301, "modules": []}
    assert f"sketch kernels: ahead-of-time build {built.result.path}" in out.stderr


def _warmup(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", "agent", "warmup", "-c",
                           str(config)], capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(ROOT)})


def _config(tmp_path: Path, keypair: Any) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'device_id = "aot-test"\ndata_dir = "{tmp_path / "data"}"\n'
                   f'trusted_keys = ["{keypair.public_path}"]\n')
    return cfg


@pytest.mark.slow
def test_warmup_builds_the_sketch_kernels(tmp_path: Path, keypair: Any) -> None:
    """`agent warmup` builds into the data dir's numba cache, where `agent run` looks; run
    again (as the unit's ExecStartPre does at every start) it finds the build."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    first = _warmup(_config(tmp_path, keypair), env)
    assert first.returncode == 0, first.stderr
    (path,) = (tmp_path / "data" / "numba-cache" / "aot").glob("edgefleet_sketch_*.so")
    assert f"sketch kernels: ahead-of-time build {path} (built in" in first.stdout
    second = _warmup(_config(tmp_path, keypair), env)
    assert second.returncode == 0, second.stderr
    assert f"sketch kernels: ahead-of-time build {path} (up to date)" in second.stdout
    assert "warning" not in first.stderr + second.stderr


@pytest.mark.slow
def test_warmup_without_a_compiler_warns_and_warms_the_jit(tmp_path: Path,
                                                           keypair: Any) -> None:
    """No C compiler: warmup says so, exits 0, and fills numba's cache for the sketch kernels
    instead, which the agent then uses."""
    cache = tmp_path / "cache"
    env = {**os.environ, "CC": "/nonexistent/cc", "NUMBA_CACHE_DIR": str(cache)}
    proc = _warmup(_config(tmp_path, keypair), env)
    assert proc.returncode == 0, proc.stderr
    assert "warning: sketch kernels not built ahead of time" in proc.stderr
    assert "'/nonexistent/cc'" in proc.stderr
    assert not (cache / "aot").exists()
    assert any(p.name.startswith("sketch_kernels.") for p in cache.rglob("*.nbi"))


def test_a_build_others_could_write_is_not_loaded(built: Built, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A build in a folder (or a file) that group or others may write is never imported as
    code: another local user could have put it there; the JIT folds instead."""
    import shutil

    path = sketch_aot.build_path(tmp_path)
    path.parent.mkdir()
    shutil.copy2(built.result.path, path)
    assert sketch_aot.load(tmp_path) is not None  # the copy itself is fine
    for target, mode in ((path.parent, 0o777), (path, 0o666)):
        saved = target.stat().st_mode & 0o777
        target.chmod(mode)
        try:
            with caplog.at_level(logging.WARNING, logger="edge_agent.sketch_aot"):
                caplog.clear()
                assert sketch_aot.load(tmp_path) is None
            assert "writable by group or others" in caplog.text
        finally:
            target.chmod(saved)
