"""fleet_protocol stays light: the hub and tools import it without the device/training stacks."""

from __future__ import annotations

import subprocess
import sys


def test_importing_fleet_protocol_loads_no_heavy_stack() -> None:
    """Importing every fleet_protocol module loads no numba, onnxruntime or scikit-learn."""
    code = (
        "import sys, pkgutil, importlib, fleet_protocol\n"
        "for m in pkgutil.iter_modules(fleet_protocol.__path__):\n"
        "    importlib.import_module('fleet_protocol.' + m.name)\n"
        "heavy = [m for m in ('numba', 'onnxruntime', 'sklearn', 'scipy', 'skl2onnx', 'onnx')\n"
        "         if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""

