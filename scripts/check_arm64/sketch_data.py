"""Shared by host_compile.py and device_check.py: a fixed sketch layout and data to fold."""
import numpy as np

from fleet_protocol.sketch import FeatureLayout, SketchLayout


def layout_and_values():
    rng = np.random.default_rng(7)
    edges = tuple(float(v) for v in np.linspace(-2.5, 2.5, 15))
    feats = [FeatureLayout(f"x{i}", "numeric", edges=edges) for i in range(16)]
    feats.append(FeatureLayout("c", "categorical", categories=("a", "b", "c")))
    values = rng.normal(0, 1.3, (4096, 17))
    values[:, :16] *= rng.uniform(0.2, 3.0, 16)
    num = values[:, :16]
    num[rng.random(num.shape) < 0.02] = np.nan  # missing values
    values[:, 16] = rng.integers(-1, 4, 4096)
    values[::97, 16] = np.nan
    ends = np.array([1, 100, 1024, 1025, 3000, 4096], dtype=np.int64)
    return SketchLayout(tuple(feats)), values, ends


def fold(kernel, layout, values, ends):
    """Fold ``values`` twice (the second merges into stored moments) with ``kernel``: "jit",
    or an AotKernel; returns (result, counts, missing, moments)."""
    from edge_agent import sketch_kernels
    from edge_agent.sketching import KernelLayout, _kernel_args
    from fleet_protocol.sketch import Sketch

    kl = KernelLayout.from_layout(layout)
    sk = Sketch.empty(layout)
    res = None
    for _ in range(2):
        args = _kernel_args(sk, kl, np.ascontiguousarray(values), ends)
        res = tuple(sketch_kernels._update_segments_kernel(*args) if kernel == "jit"
                    else kernel.fold(args))
    return res, sk.counts.copy(), sk.missing.copy(), sk.moments.copy()
