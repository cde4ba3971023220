"""What a loaded model costs in memory: no numba without preprocessing, one copy of the model,
freed heap handed back (issue 3: RSS with one model loaded)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np

from edge_agent.bundle import load_public_key, read_bundle
from edge_agent.model import BundleModel


def _run(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_bundle_without_preprocessing_loads_no_numba(small_bundle: Any, keypair: Any) -> None:
    """A bundle whose features are its raw columns loads, replays its test vectors and predicts
    without importing numba or llvmlite (LLVM alone maps ~100 MiB)."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from edge_agent.bundle import load_public_key, read_bundle\n"
        "from edge_agent.model import BundleModel\n"
        "bundle = read_bundle(sys.argv[1], [load_public_key(sys.argv[2])])\n"
        "model = BundleModel.from_bundle(bundle)\n"
        "assert not model.replay_test_vectors(bundle.manifest.test_vectors)\n"
        "model.predict(np.zeros((1, len(bundle.manifest.inputs)), dtype=np.float32))\n"
        "print(','.join(m for m in ('numba', 'llvmlite') if m in sys.modules))\n"
    )
    assert _run(code, str(small_bundle.path), str(keypair.public_path)) == ""


def test_bundle_with_preprocessing_runs_its_spec(signal_bundle: Any, keypair: Any) -> None:
    """A bundle with preprocessing ops loads run_spec with the model: its test vectors pass."""
    bundle = read_bundle(signal_bundle.path, [load_public_key(keypair.public_path)])
    model = BundleModel.from_bundle(bundle)
    assert bundle.manifest.preprocessing
    assert model.replay_test_vectors(bundle.manifest.test_vectors) == []


def test_session_keeps_no_second_reference_to_the_model_bytes(small_bundle: Any,
                                                              keypair: Any) -> None:
    """onnxruntime's wrapper would keep the model's bytes for its provider fallback; the
    loaded model drops that reference, so whoever holds the bundle decides their life."""
    bundle = read_bundle(small_bundle.path, [load_public_key(keypair.public_path)])
    before = sys.getrefcount(bundle.model_bytes)
    model = BundleModel.from_bundle(bundle)
    after = sys.getrefcount(bundle.model_bytes)  # not in the assert: pytest's rewrite holds one
    assert after == before
    x = np.zeros((3, len(bundle.manifest.inputs)), dtype=np.float32)
    assert len(model.predict(x).labels) == 3


def test_release_freed_heap_returns_pages_below_the_top_of_the_heap() -> None:
    """Freed chunks pinned under a live one stay resident until release_freed_heap (glibc);
    elsewhere it is a no-op that returns."""
    code = (
        "import ctypes, sys\n"
        "from edge_agent.model import _malloc_trim, release_freed_heap\n"
        "def rss():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:')) // 1024\n"
        "if _malloc_trim is None:\n"
        "    release_freed_heap(); print('no glibc'); sys.exit()\n"
        "# 4 KiB blocks go to malloc's heap (not pymalloc, not mmap); the last one pins the top\n"
        "blocks = [ctypes.create_string_buffer(4000) for _ in range(5000)]\n"
        "pin = ctypes.create_string_buffer(4000)\n"
        "full = rss()\n"
        "del blocks\n"
        "freed = rss()\n"
        "release_freed_heap()\n"
        "print(full, freed, rss())\n"
    )
    out = _run(code)
    if out == "no glibc":
        return
    full, freed, released = (int(v) for v in out.split())
    assert freed > full - 5  # glibc keeps the freed 19 MiB resident by itself
    assert released < freed - 15
