"""`edgefleet demo`: the main job, end to end on real data shipped with scikit-learn.

Train a digit classifier on `load_digits`, compile it into a signed bundle (parity gate,
baseline, calibrated thresholds, test vectors), verify it as a device would and print it; then
run a fleet on this machine (edgefleet.fleet_demo): a broker, the hub, and five agent processes
fed held-out digits, one site photographing them under brighter light; the hub merges their
telemetry and prints the fleet drift table in which that site stands out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

__all__ = ["demo", "run_demo"]


@dataclass(frozen=True)
class DemoResult:
    bundle: Path
    #: device -> names of its drifted features and outputs (judged at the hub)
    drifted: dict[str, list[str]]
    features: int
    #: devices as the fleet drift query ranks them, most drifted first
    ranking: list[str]
    #: device -> telemetry windows the hub stored from it
    windows: dict[str, int]


def run_demo(workdir: Path, echo: bool = True) -> DemoResult:
    """Train, compile, verify and inspect the demo bundle, then run the fleet around it."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from compiler.cli import _format_manifest
    from compiler.compile import compile_bundle
    from compiler.data import dataset_from_arrays
    from compiler.signing import generate_keys, load_private_key
    from edge_agent.bundle import load_public_key, read_bundle
    from edge_agent.model import BundleModel

    say = click.echo if echo else (lambda *_a, **_k: None)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    keys_dir = workdir / "keys"
    if not (keys_dir / "edgefleet.key").exists():
        generate_keys(keys_dir)
    say(f"[1/4] signing keys in {keys_dir}")

    digits = load_digits()
    X = digits.data.astype(np.float32)
    y = digits.target
    # train 50% / holdout 15% (parity, metrics, output baseline) / field 35%: what the devices
    # see, enough for each quiet site to get its own digits (no digit seen at two sites)
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, test_size=0.5, random_state=0,
                                                        stratify=y)
    X_hold, X_field, y_hold, _y_field = train_test_split(X_rest, y_rest, test_size=0.7,
                                                         random_state=0, stratify=y_rest)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(X_train, y_train)
    say(f"[2/4] trained {type(model[-1]).__name__} on {len(X_train)} digits (8x8 pixels)")

    names = [f"px{r}{c}" for r in range(8) for c in range(8)]
    result = compile_bundle(
        model,
        dataset_from_arrays(X_train, y_train, source="load_digits[train]"),
        dataset_from_arrays(X_hold, y_hold, source="load_digits[holdout]", require_labels=True),
        name="digits", version="1.0.0",
        signing_key=load_private_key(keys_dir / "edgefleet.key"),
        output=workdir, feature_names=names,
    )
    say(f"[3/4] compiled {result.path.name}: {result.bundle_bytes} bytes in "
        f"{result.seconds:.1f}s")

    verified = read_bundle(result.path, [load_public_key(keys_dir / "edgefleet.pub")])
    failures = BundleModel.from_bundle(verified).replay_test_vectors(
        verified.manifest.test_vectors)
    say(f"[4/4] verified as a device would: signature ok, model hash ok, "
        f"{len(verified.manifest.test_vectors) - len(failures)}/"
        f"{len(verified.manifest.test_vectors)} test vectors pass\n")
    say(_format_manifest(result.path, verified.signer_key_id))
    if failures:
        raise click.ClickException(f"test vector #{failures[0].index}: {failures[0].reason}")
    say("")
    from edgefleet.fleet_demo import run_fleet

    fleet = run_fleet(workdir, result.path, keys_dir, X_field, say=say)
    say(f"demo finished in {time.perf_counter() - t0:.1f}s; nothing left running")
    n = len(result.manifest.baseline.features) + len(result.manifest.baseline.outputs)
    return DemoResult(result.path, fleet.drifted, n, fleet.ranking, fleet.windows)


def brighter(images: Any) -> Any:
    """The lighting change from field practice: every pixel brighter, saturating at 16."""
    import numpy as np

    return np.minimum(images * 1.6 + 2.0, 16.0).astype(np.float32)


@click.command("demo")
@click.option("--workdir", default="demo-output", show_default=True,
              type=click.Path(path_type=Path), help="Folder for keys and bundles.")
def demo(workdir: Path) -> None:
    """Train, compile and verify a digit classifier; run a 5-device fleet; show fleet drift."""
    run_demo(workdir)
