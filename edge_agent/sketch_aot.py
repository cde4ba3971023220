"""The sketch kernel compiled ahead of time, so a serving agent folds without numba or LLVM.

numba's on-disk cache still needs numba and LLVM in the process to load it: on the RF100 cold
start they held ~117 MiB of the agent's 263-267 MiB after its first fold (94 MiB of it
libllvmlite.so's pages).
numba.pycc compiles ``sketch_kernels._update_segments_kernel`` into a plain CPython extension
module instead, one entry point per value dtype (float32, float64), with
``sketch_kernels._decode_kernel`` beside them, which imports with numpy alone.
``edgefleet agent warmup`` builds it (:func:`build`) into ``<numba cache dir>/aot/``;
:mod:`edge_agent.sketching` loads it (:func:`load`) when there is one, else uses numba's JIT.

The file is named by a hash of everything its machine code depends on (:func:`build_key`): the
kernel module's and this module's source, ``MOMENT_LIMIT``, the numba, llvmlite, numpy and Python
versions, the machine, and the CPU (model and feature flags of the first processor in
/proc/cpuinfo, and numba's CPU overrides). A stale build is never loaded: a changed key names a
missing file, the agent uses the JIT, and the next warmup builds the new file and deletes the
old ones.

The build generates what the JIT does, through two pycc internals patched for its duration
(:func:`_as_jit`): code for this CPU's name *and* its features, as the JIT (``target_cpu="host"``
alone takes the named model's default features: the 2-vCPU cloud VM reports as ``rocketlake``
with AMX and AVX512-FP16, which that model lacks, and another VM may lack some of its features);
and the GIL released during the call, as ``nogil=True`` (pycc's wrapper holds it). The tests pin
both: the same bits as the JIT, and another thread running during a fold.

pycc's wrapper does not check its arguments' types (a float64 array passed where it expects
int64 is read as int64; a read-only sketch is written to): :meth:`AotKernel.fold` checks the
sketch's arrays, the values and the ends against the compiled signature first (KernelLayout
checked the layout's once) and declines (None) when one differs, for the JIT to fold.

The build needs a C and C++ compiler, the Python headers and setuptools (pycc compiles numba's C
helpers into the module): without them :func:`build` says which is missing before compiling
anything, and the agent keeps the JIT. Measured (2-vCPU x86-64 cloud VM, numba 0.68): the build
takes 3-10 s (the less when numba's cache holds the kernel's callees) and writes 0.75 MB; a
1024 x 16 float32 fold takes 55 µs (thread CPU time, best of repeats), as with the JIT; the
agent's RSS after its first fold drops from 263 to 122 MiB (RF100 cold start).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import platform
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.atomic import atomic_write_bytes
from fleet_protocol.sketch import MOMENT_LIMIT

__all__ = ["AotKernel", "BuildResult", "build", "build_key", "build_path", "load",
           "toolchain_problem"]

log = logging.getLogger(__name__)

_KERNELS_SOURCE = Path(__file__).with_name("sketch_kernels.py")
_PREFIX = "edgefleet_sketch_"
#: the /proc/cpuinfo keys that name a CPU and its features (x86: vendor_id..flags; ARM: the rest)
_CPU_KEYS = frozenset({"vendor_id", "cpu family", "model", "model name", "flags",
                       "CPU implementer", "CPU architecture", "CPU variant", "CPU part",
                       "Features", "isa", "uarch"})

_I8, _F4, _F8, _B1, _U1 = (np.dtype(t) for t in (np.int64, np.float32, np.float64, np.bool_,
                                                  np.uint8))
_NUMBA_NAMES = {_I8: "i8", _F4: "f4", _F8: "f8", _B1: "b1", _U1: "u1"}
#: ``_update_segments_kernel``'s arguments, in order: (name, dtype, ndim, kind), every one
#: C-contiguous; ``values`` has the entry point's dtype. Kind: "sketch" arrays are written,
#: "layout" ones come from a KernelLayout (which makes them so on construction), "call" ones
#: are read.
_ARGS: tuple[tuple[str, np.dtype[Any] | None, int, str], ...] = (
    ("counts", _I8, 1, "sketch"), ("missing", _I8, 1, "sketch"), ("moments", _F8, 2, "sketch"),
    ("offsets", _I8, 1, "layout"), ("edges", _F8, 1, "layout"), ("last_edge", _F8, 1, "layout"),
    ("edge_start", _I8, 1, "layout"), ("edge_count", _I8, 1, "layout"),
    ("numeric", _B1, 1, "layout"), ("n_slots", _I8, 1, "layout"),
    ("values", None, 2, "call"), ("ends", _I8, 1, "call"),
)
#: exported name per dtype of ``values``
_ENTRY = {_F4: "update_segments_f4", _F8: "update_segments_f8"}
_Check = tuple[int, np.dtype[Any], int, bool]
#: ``_decode_kernel``'s arguments, as ``_ARGS`` (ndim 0: an int64 scalar, kind "scalar"); the
#: probabilities are float32 (what a deferred batch holds)
_DECODE_ARGS: tuple[tuple[str, np.dtype[Any], int, str], ...] = (
    ("raw", _I8, 1, "call"), ("probabilities", _F4, 2, "call"), ("table", _I8, 1, "call"),
    ("shift", _I8, 0, "scalar"), ("ranges", _I8, 2, "call"), ("outputs", _F8, 2, "written"),
    ("log_scores", _F4, 1, "written"), ("log_codes", _U1, 1, "written"),
    ("code_bytes", _I8, 0, "scalar"),
)
_DECODE_ENTRY = "decode_f4"
_DECODE_CHECKS: tuple[_Check, ...] = tuple(
    (k, d, ndim, kind == "written") for k, (_, d, ndim, kind) in enumerate(_DECODE_ARGS)
    if kind != "scalar")


def _types(values: np.dtype[Any]) -> list[tuple[np.dtype[Any], int]]:
    return [(values if dtype is None else dtype, ndim) for _, dtype, ndim, _ in _ARGS]


def _numba_type(dtype: np.dtype[Any], ndim: int) -> str:
    """A C-contiguous array's (or, ndim 0, a scalar's) numba type name, e.g. ``f4[:, ::1]``."""
    return _NUMBA_NAMES[dtype] + ("", "[::1]", "[:, ::1]")[ndim]


def _signature(values: np.dtype[Any]) -> str:
    """The numba signature of one entry point, e.g. ``UniTuple(i8, 3)(i8[::1], ...)``."""
    args = ", ".join(_numba_type(d, ndim) for d, ndim in _types(values))
    return f"UniTuple(i8, 3)({args})"


#: ``_decode_kernel``'s signature
_DECODE_SIGNATURE = "i8(" + ", ".join(_numba_type(d, ndim)
                                      for _, d, ndim, _ in _DECODE_ARGS) + ")"


def _checks(values: np.dtype[Any]) -> tuple[_Check, ...]:
    """(index, dtype, ndim, written) of the arguments checked on each call: all but the
    layout's, which KernelLayout checked once."""
    out = []
    for k, ((dtype, ndim), (_, _, _, kind)) in enumerate(zip(_types(values), _ARGS, strict=True)):
        if kind != "layout":
            out.append((k, dtype, ndim, kind == "sketch"))
    return tuple(out)


def _dist_version(name: str) -> str:
    # from the installed metadata: importing numba to read numba.__version__ is what this avoids
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _cpu_id() -> str:
    """The first processor's model and feature lines in /proc/cpuinfo (elsewhere, platform's
    processor string): a build for one CPU is never loaded on another."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines: list[str] = []
            for line in f:
                if not line.strip():
                    if lines:
                        break  # one processor is enough
                    continue
                key = line.split(":", 1)[0].strip()
                if key in _CPU_KEYS:
                    lines.append(" ".join(line.split()))
        return "\n".join(lines)
    except OSError:
        return platform.processor()


@functools.cache
def build_key() -> str:
    """Hash of everything the built machine code depends on (see the module docstring)."""
    h = hashlib.sha256()
    parts = [_KERNELS_SOURCE.read_bytes(), Path(__file__).read_bytes()]
    parts += [s.encode() for s in (
        repr(MOMENT_LIMIT), _dist_version("numba"), _dist_version("llvmlite"), np.__version__,
        sys.version, sys.implementation.cache_tag or "", platform.machine(), _cpu_id(),
        os.environ.get("NUMBA_CPU_NAME", ""), os.environ.get("NUMBA_CPU_FEATURES", ""),
    )]
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:24]


def build_path(cache_dir: Path) -> Path:
    """Where the build for this process's :func:`build_key` lives under a numba cache dir."""
    return cache_dir / "aot" / f"{_PREFIX}{build_key()}.so"


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build` did: ``error`` is None when the build at ``path`` is there."""

    path: Path
    #: compiled by this call (False: it was there already, or it failed)
    built: bool
    seconds: float
    error: str | None = None


def toolchain_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """Why pycc cannot build here (everything that is missing, and how to install it), or None.

    A minimal install lacks several pieces at once (Debian minbase: the Python headers and
    both compilers): naming them all saves the user one failed warmup per piece."""
    env = os.environ if environ is None else environ
    missing: list[str] = []
    if importlib.util.find_spec("setuptools") is None:
        missing.append("setuptools is not installed (numba.pycc needs it: pip install setuptools)")
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        missing.append(f"the Python headers are not installed ({headers} is missing: "
                       "apt-get install python3-dev)")
    for var, what in (("CC", "C"), ("CXX", "C++")):
        command = env.get(var) or sysconfig.get_config_var(var)
        if not command:
            continue
        exe = shlex.split(command)[0]
        if shutil.which(exe) is None:
            missing.append(f"no {what} compiler ({exe!r}, from {var}, is not on PATH: "
                           "apt-get install build-essential)")
    return "; ".join(missing) or None


def build(cache_dir: Path) -> BuildResult:
    """Compile the kernel into :func:`build_path` unless it is there (what ``edgefleet agent
    warmup`` does for the sketch kernels); never raises for a failed build: ``error`` says why.

    The file is written atomically (temp file, fsync, rename), so a power cut leaves either no
    build or a whole one; older builds in the folder are deleted after a successful one. A file
    already there that :func:`load` would refuse (it does not import, or others could have
    written it) is built again, so warmup leaves a build the agent uses.
    """
    path = build_path(cache_dir)
    if path.exists():
        unusable = _untrusted(path) or _import_problem(path)
        if unusable is None:
            return BuildResult(path, built=False, seconds=0.0)
        log.warning("sketch kernels: building %s again (the file there is not used: %s)",
                    path, unusable)
        with contextlib.suppress(OSError):
            path.unlink()
    problem = toolchain_problem()
    if problem is not None:
        log.info("sketch kernels not built ahead of time: %s", problem)  # the caller reports
        return BuildResult(path, built=False, seconds=0.0, error=problem)
    t0 = time.perf_counter()
    name = path.name.removesuffix(".so")
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-sketch-aot-") as tmp:
            _compile(name, Path(tmp))
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            path.parent.chmod(path.parent.stat().st_mode & ~0o022)  # see _untrusted
            atomic_write_bytes(path, (Path(tmp) / path.name).read_bytes(), mode=0o755)
    except Exception as err:  # pycc's errors are numba's, distutils' and OSError: all reported
        seconds = time.perf_counter() - t0
        error = f"numba.pycc failed after {seconds:.1f}s: {type(err).__name__}: {err}"
        log.info("sketch kernels not built ahead of time: %s", error)
        return BuildResult(path, built=False, seconds=seconds, error=error)
    for old in path.parent.glob(f"{_PREFIX}*.so"):
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()  # a process that has it loaded keeps its mapping
    seconds = time.perf_counter() - t0
    log.info("sketch kernels built ahead of time into %s in %.1fs", path, seconds)
    return BuildResult(path, built=True, seconds=seconds)


def _compile(name: str, out_dir: Path) -> None:
    """pycc: both entry points into ``out_dir/<name>.so`` (pycc's own temp files: its
    ``pycc-build-<name>-*`` folder in the temp dir, left there when it fails, removed here)."""
    scratch = Path(tempfile.gettempdir())
    before = set(scratch.glob(f"pycc-build-{name}-*"))
    try:
        with warnings.catch_warnings():
            # pycc is pending deprecation (its replacement is not released); the suite runs -W error
            from numba.core.errors import NumbaDeprecationWarning, NumbaPendingDeprecationWarning

            warnings.simplefilter("ignore", NumbaPendingDeprecationWarning)
            warnings.simplefilter("ignore", NumbaDeprecationWarning)
            from numba.pycc import CC

            from edge_agent import sketch_kernels

            cc = CC(name, source_module=sketch_kernels)
            cc.output_dir = str(out_dir)
            cc.output_file = f"{name}.so"
            cc.target_cpu = "host"
            for dtype, entry in _ENTRY.items():
                cc.export(entry, _signature(dtype))(sketch_kernels._update_segments_kernel.py_func)
            cc.export(_DECODE_ENTRY, _DECODE_SIGNATURE)(sketch_kernels._decode_kernel.py_func)
            with _as_jit(), _root_log_level_kept():
                cc.compile()
    finally:
        for left in set(scratch.glob(f"pycc-build-{name}-*")) - before:
            shutil.rmtree(left, ignore_errors=True)


@contextlib.contextmanager
def _root_log_level_kept() -> Iterator[None]:
    """pycc sets distutils' log threshold to WARN (numba/pycc/platform.py), and setuptools'
    distutils logger is the root logger: without this, ``edgefleet -v agent warmup`` stopped
    logging at INFO after the build, its own "built ahead of time" line included."""
    root = logging.getLogger()
    level = root.level
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _as_jit() -> Iterator[None]:
    """While pycc compiles: the host CPU's features (as the JIT's codegen takes them) and a
    wrapper that releases the GIL (as ``nogil=True``). Both are pycc internals of numba 0.68:
    the tests fail, rather than the build silently differ, if a numba release moves them."""
    from numba.core import codegen
    from numba.pycc import compiler

    class _NoGilFlags(compiler.Flags):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            flags: Any = self  # numba types its options as their descriptor class
            flags.release_gil = True

    jit_features = codegen.JITCPUCodegen._customize_tm_features
    with _patched(compiler, "Flags", _NoGilFlags), \
            _patched(codegen.AOTCPUCodegen, "_customize_tm_features", jit_features):
        yield


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(owner, name)  # AttributeError (a failed build) if numba moved it
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _args_fit(args: Sequence[Any], checks: tuple[_Check, ...]) -> bool:
    """Whether each checked argument is an array of the compiled dtype and ndim, C-contiguous
    and aligned, and writable where the kernel writes it."""
    for k, dtype, ndim, written in checks:
        a = args[k]
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim:
            return False
        flags = a.flags
        if not (flags.c_contiguous and flags.aligned) or (written and not flags.writeable):
            return False
    return True


class AotKernel:
    """The loaded build: :meth:`fold` calls the entry point for the values' dtype,
    :meth:`decode` the decoder of deferred batches."""

    __slots__ = ("_decode", "_entries", "path")

    def __init__(self, path: Path, module: Any) -> None:
        self.path = path
        self._entries: dict[np.dtype[Any], tuple[Callable[..., tuple[int, int, int]],
                                                  tuple[_Check, ...]]]
        try:
            self._entries = {dtype: (getattr(module, entry), _checks(dtype))
                             for dtype, entry in _ENTRY.items()}
            self._decode: Callable[..., int] = getattr(module, _DECODE_ENTRY)
        except AttributeError as err:
            raise ImportError(f"{path} is not a build of this kernel ({err})") from err

    def fold(self, args: Sequence[Any]) -> tuple[int, int, int] | None:
        """``_update_segments_kernel(*args)``, or None (nothing done) when a sketch array, the
        values or the ends are not of the compiled dtype, shape, layout or writability: the
        caller folds those with the JIT. The layout's arrays (``args[3:10]``) must come from a
        :class:`~edge_agent.sketching.KernelLayout`, which checked them: checking these five
        takes ~1 µs a call, all twelve took 2.5 (a 1024 x 16 fold takes ~55)."""
        values = args[10]
        entry = self._entries.get(values.dtype) if isinstance(values, np.ndarray) else None
        if entry is None:
            return None
        fn, checks = entry
        return fn(*args) if _args_fit(args, checks) else None

    def decode(self, args: Sequence[Any]) -> int | None:
        """``_decode_kernel(*args)``, or None (nothing done) when an array is not of the
        compiled dtype, shape, layout or writability (the caller decodes with the JIT). The
        kernel reads ``raw``, ``probabilities`` and ``table`` at the rows and indices of
        ``ranges`` and the table's length without bounds checks: the caller made them agree."""
        return self._decode(*args) if _args_fit(args, _DECODE_CHECKS) else None


def _untrusted(path: Path) -> str | None:
    """Why a build file may not be loaded as code (None: it may): it and its folder must
    belong to this user (or root) and be writable by nobody else, or another local user could
    plant code there (an inherited NUMBA_CACHE_DIR such as /tmp/numba is shared)."""
    me = os.geteuid()
    for p in (path, path.parent):
        st = p.stat()
        if st.st_uid not in (me, 0):
            return f"{p} belongs to uid {st.st_uid}, not to this user ({me})"
        if st.st_mode & 0o022:
            return f"{p} is writable by group or others (mode {st.st_mode & 0o777:o})"
    return None


def _import(path: Path) -> Any:
    """The build at ``path`` as a module, imported by file path (ImportError, OSError)."""
    name = path.name.removesuffix(".so")
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader, origin=str(path))
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _import_problem(path: Path) -> str | None:
    """Why the build at ``path`` does not import as an AotKernel, or None."""
    try:
        AotKernel(path, _import(path))
    except (ImportError, OSError) as err:  # AotKernel turns a missing entry into ImportError
        return f"it does not import: {type(err).__name__}: {err}"
    return None


def load(cache_dir: Path) -> AotKernel | None:
    """The build for this process's key under ``cache_dir``, imported by file path; None (and
    one log line saying why) when there is none or it does not import."""
    path = build_path(cache_dir)
    if not path.exists():
        log.info("sketch kernels: numba's JIT (no ahead-of-time build %s; `edgefleet agent "
                 "warmup` builds it)", path)
        return None
    unsafe = _untrusted(path)
    if unsafe:
        log.warning("sketch kernels: numba's JIT (the ahead-of-time build %s is not loaded: "
                    "%s)", path, unsafe)
        return None
    try:
        kernel = AotKernel(path, _import(path))
    except (ImportError, OSError) as err:
        log.warning("sketch kernels: numba's JIT (the ahead-of-time build %s does not import: "
                    "%s; delete it and run `edgefleet agent warmup`)", path, err)
        return None
    log.info("sketch kernels: ahead-of-time build %s (numba not loaded)", path)
    return kernel
