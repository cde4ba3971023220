"""CLI: `edgefleet compile`, `edgefleet bundle inspect|verify`, `edgefleet keys generate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from compiler.errors import InputDataError

__all__ = ["bundle", "compile_command", "keys"]


def _load_model(path: Path) -> Any:
    import joblib

    try:
        # joblib files are pickles: load only models you (or your pipeline) produced.
        return joblib.load(path)
    except FileNotFoundError as err:
        raise InputDataError(f"model file {path} does not exist") from err
    except Exception as err:  # unpickling raises anything from EOFError to AttributeError
        raise InputDataError(
            f"model file {path} is not a readable joblib file ({type(err).__name__}: {err})"
        ) from err


@click.command("compile")
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option("--train", "train_path", required=True, type=click.Path(path_type=Path),
              help="Training data (or a sample): CSV, .npz or Parquet.")
@click.option("--holdout", "holdout_path", required=True, type=click.Path(path_type=Path),
              help="Holdout with labels: CSV, .npz or Parquet.")
@click.option("--label", default=None, help="Label column name (CSV/Parquet).")
@click.option("--name", required=True, help="Bundle name (lowercase, e.g. vibration-rf).")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.0.0.")
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path),
              help="Ed25519 private key (edgefleet keys generate).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output .edgebundle file or folder.")
@click.option("--tolerance", default=1e-4, show_default=True, type=click.FloatRange(min=0),
              help="Parity tolerance (probabilities; regression: relative).")
@click.option("--bins", "n_bins", default=16, show_default=True, type=click.IntRange(2, 256),
              help="Baseline bins per numeric feature.")
@click.option("--seed", default=0, show_default=True, type=int)
def compile_command(model_file: Path, train_path: Path, holdout_path: Path, label: str | None,
                    name: str, version: str, key_path: Path, output: Path, tolerance: float,
                    n_bins: int, seed: int) -> None:
    """Compile MODEL_FILE (a joblib-saved fitted pipeline) into a signed bundle."""
    from compiler.compile import CompileOptions, compile_bundle
    from compiler.data import load_dataset
    from compiler.signing import load_private_key

    key = load_private_key(key_path)
    model = _load_model(model_file)
    train = load_dataset(train_path, label=label)
    holdout = load_dataset(holdout_path, label=label, require_labels=True)
    options = CompileOptions(tolerance=tolerance, n_bins=n_bins, seed=seed)
    result = compile_bundle(model, train, holdout, name=name, version=version, signing_key=key,
                            output=output, options=options)
    m = result.manifest
    click.echo(
        f"wrote {result.path} ({result.bundle_bytes} bytes) in {result.seconds:.1f}s: "
        f"parity max diff {m.parity.max_abs_diff:.2g}, "
        + ", ".join(f"{k} {v:.4g}" for k, v in m.metrics.items())
    )


@click.group()
def bundle() -> None:
    """Inspect and verify .edgebundle files."""


def _format_manifest(path: Path, verified_by: str | None) -> str:
    from edge_agent.bundle import read_unverified_manifest

    m = read_unverified_manifest(path)
    lines = [
        f"bundle      {path}",
        f"name        {m.name} {m.version} ({m.task})",
        f"signature   {'verified, key ' + verified_by if verified_by else 'NOT verified'}"
        f" (signer {m.signer_key_id})",
        f"model       {m.model.size_bytes} bytes sha256 {m.model.sha256[:16]}..., "
        f"{m.model.input_mode} input, opsets {m.model.opsets}",
    ]
    if m.labels:
        lines.append(f"labels      {', '.join(m.labels)}")
    lines.append("inputs      " + ", ".join(
        f"{f.name}:{f.kind}" + (f"[{f.length}]" if f.length else "") for f in m.inputs[:12])
        + (" ..." if len(m.inputs) > 12 else ""))
    if m.preprocessing:
        lines.append("preprocess  " + " -> ".join(
            op.op + json.dumps(op.params, separators=(",", ":")) for op in m.preprocessing))
    lines.append(f"features    {len(m.model_features)} model features, baseline of "
                 f"{m.baseline.rows} rows, min evidence {m.baseline.min_evidence}")
    lines.append("metrics     " + ", ".join(f"{k} {v:.4g}" for k, v in m.metrics.items()))
    p = m.parity
    lines.append(f"parity      {'passed' if p.passed else 'FAILED'}: max diff "
                 f"{p.max_abs_diff:.3g} (tolerance {p.tolerance:g}) on {p.rows} rows, "
                 f"{p.label_mismatches} label flips, {p.boundary_ties} boundary ties")
    lines.append("latency     bundle p50 {bundle_p50:.0f} us p99 {bundle_p99:.0f} us; "
                 "sklearn p50 {sklearn_p50:.0f} us".format(**m.latency_us))
    lines.append(f"vectors     {len(m.test_vectors)} test vectors")
    pv = m.provenance
    lines.append(f"provenance  {pv.estimator}, trained on {pv.training_rows} rows "
                 f"(sha256 {pv.training_sha256[:12]}...), git {pv.git_commit or '-'}, "
                 f"{pv.created_at}")
    lines.append("libraries   " + ", ".join(f"{k} {v}" for k, v in pv.libraries.items()))
    lines.append("")
    lines.append(f"{'feature':<20} {'kind':<12} {'bins':>4} {'psi@1000':>9} {'js@1000':>8}")
    from fleet_protocol.verdict import threshold_at

    for fb in m.baseline.features + m.baseline.outputs:
        lines.append(
            f"{fb.name[:20]:<20} {fb.kind:<12} {len(fb.counts):>4} "
            f"{threshold_at(fb.thresholds, 1000, 'psi'):>9.4f} "
            f"{threshold_at(fb.thresholds, 1000, 'js'):>8.4f}"
        )
    return "\n".join(lines)


@bundle.command("inspect")
@click.argument("bundle_file", type=click.Path(path_type=Path))
@click.option("--trusted-key", "trusted", multiple=True, type=click.Path(path_type=Path),
              help="Public key to verify with (optional; repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect_command(bundle_file: Path, trusted: tuple[Path, ...], as_json: bool) -> None:
    """Print a bundle's manifest readably."""
    from edge_agent.bundle import load_public_key, read_bundle, read_unverified_manifest

    verified_by = None
    if trusted:
        verified_by = read_bundle(bundle_file, [load_public_key(p) for p in trusted]).signer_key_id
    if as_json:
        m = read_unverified_manifest(bundle_file)
        click.echo(json.dumps(m.model_dump(mode="json"), indent=2))
        return
    click.echo(_format_manifest(bundle_file, verified_by))


@bundle.command("verify")
@click.argument("bundle_file", type=click.Path(path_type=Path))
@click.option("--trusted-key", "trusted", multiple=True, required=True,
              type=click.Path(path_type=Path), help="Trusted public key (repeatable).")
def verify_command(bundle_file: Path, trusted: tuple[Path, ...]) -> None:
    """Check a bundle's signature, hashes, ONNX content and test vectors."""
    from edge_agent.bundle import load_public_key, read_bundle
    from edge_agent.errors import BundleError
    from edge_agent.model import BundleModel

    verified = read_bundle(bundle_file, [load_public_key(p) for p in trusted])
    failures = BundleModel.from_bundle(verified).replay_test_vectors(
        verified.manifest.test_vectors)
    if failures:
        raise BundleError(
            f"bundle {bundle_file}: {len(failures)} test vector(s) fail, first: "
            f"#{failures[0].index} {failures[0].reason}"
        )
    m = verified.manifest
    click.echo(f"ok: {m.name} {m.version} signed by {verified.signer_key_id}, model sha256 "
               f"matches, {len(m.test_vectors)} test vectors pass")


@click.group()
def keys() -> None:
    """Manage Ed25519 signing keys."""


@keys.command("generate")
@click.option("-o", "--out-dir", default=".", show_default=True, type=click.Path(path_type=Path))
@click.option("--name", default="edgefleet", show_default=True, help="Key file base name.")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def generate_command(out_dir: Path, name: str, force: bool) -> None:
    """Write NAME.key (private, mode 0600) and NAME.pub (public) to OUT_DIR."""
    from compiler.signing import generate_keys

    pair = generate_keys(out_dir, name, overwrite=force)
    click.echo(f"private key {pair.private_path} (keep it secret)\n"
               f"public key  {pair.public_path} (give it to devices)\nkey id      {pair.key_id}")

