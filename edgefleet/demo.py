"""`edgefleet demo`: the main job, end to end on real data shipped with scikit-learn.

Today: train a digit classifier on `load_digits`, compile it into a signed bundle (parity gate,
baseline, calibrated thresholds, test vectors), verify it as a device would, print it, then
serve it on two local agents — one fed held-out digits as they are, one fed the same digits
photographed under brighter light — and print each agent's drift table. Later issues grow this
into the fleet demo (many agents, broker, hub, fleet drift).
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
    #: site -> names of the drifted features and outputs
    drifted: dict[str, list[str]]
    features: int


def run_demo(workdir: Path, echo: bool = True) -> DemoResult:
    """Train, compile, verify and inspect the demo bundle, then serve it on two agents."""
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
    # train / holdout (parity, metrics, output baseline) / field (what the devices will see)
    X_train, X_rest, y_train, y_rest = train_test_split(X, y, test_size=0.4, random_state=0,
                                                        stratify=y)
    X_hold, X_field, y_hold, _y_field = train_test_split(X_rest, y_rest, test_size=0.5,
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
    drifted: dict[str, list[str]] = {}
    for site, images in (("site-a (as trained)", X_field),
                         ("site-b (brighter lighting)", brighter(X_field))):
        name = site.split()[0]
        report, drifted[name] = _serve_site(workdir, name, result.path, keys_dir, images)
        say(f"== {site}: {len(images)} digits served by a local agent")
        say(report)
        say("")
    say(f"demo finished in {time.perf_counter() - t0:.1f}s")
    n = len(result.manifest.baseline.features) + len(result.manifest.baseline.outputs)
    return DemoResult(result.path, drifted, n)


def brighter(images: Any) -> Any:
    """The lighting change from field practice: every pixel brighter, saturating at 16."""
    import numpy as np

    return np.minimum(images * 1.6 + 2.0, 16.0).astype(np.float32)


def _serve_site(workdir: Path, site: str, bundle: Path, keys_dir: Path,
                images: Any) -> tuple[str, list[str]]:
    import shutil

    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig
    from edge_agent.drift_report import drift_report, drift_table

    data_dir = workdir / "agents" / site
    shutil.rmtree(data_dir, ignore_errors=True)
    config = AgentConfig(device_id=site, data_dir=data_dir,
                         trusted_keys=(keys_dir / "edgefleet.pub",), bundle=bundle)
    with Agent(config) as agent:
        for image in images:  # one request per image, as a camera would send them
            agent.predict(image)
        agent.flush()
        manifest = agent.serving().bundle.manifest
        windows = agent.store.windows()
        table = drift_table(manifest, windows)
        drifted_names = drift_report(manifest, windows).drifted
    lines = table.splitlines()
    drifted = [ln for ln in lines[2:-1] if ln.rstrip().endswith("DRIFT")]
    shown = lines[:2] + drifted[:8] + ([f"... {len(drifted) - 8} more drifted rows"]
                                       if len(drifted) > 8 else []) + lines[-1:]
    return "\n".join(shown), drifted_names


@click.command("demo")
@click.option("--workdir", default="demo-output", show_default=True,
              type=click.Path(path_type=Path), help="Folder for keys and bundles.")
def demo(workdir: Path) -> None:
    """Train a digit classifier, compile it to a signed bundle, verify and inspect it."""
    run_demo(workdir)
