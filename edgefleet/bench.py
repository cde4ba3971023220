"""`edgefleet bench`: benchmarks that compare against the raw baseline in the same run.

Not timed tests: they print tables of figures and ratios for the closing notes of issues.
"""

from __future__ import annotations

import functools
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

__all__ = ["bench", "compiler_bench"]


def _estimators() -> dict[str, Callable[[], Any]]:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import (
        GradientBoostingClassifier,
        GradientBoostingRegressor,
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR

    def scaled(est: Any) -> Callable[[], Any]:
        return lambda: make_pipeline(StandardScaler(), est)

    return {
        "logistic": scaled(LogisticRegression(max_iter=1000)),
        "rf100-clf": lambda: RandomForestClassifier(n_estimators=100, random_state=0),
        "gb-clf": lambda: GradientBoostingClassifier(random_state=0),
        "hgb-clf": lambda: HistGradientBoostingClassifier(random_state=0),
        "mlp-clf": scaled(MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=300,
                                        random_state=0)),
        "svc-prob": scaled(SVC(probability=True, random_state=0)),
        "svc-calibrated": scaled(CalibratedClassifierCV(SVC(random_state=0), ensemble=False)),
        "linear": lambda: LinearRegression(),
        "ridge": scaled(Ridge()),
        "rf100-reg": lambda: RandomForestRegressor(n_estimators=100, random_state=0),
        "gb-reg": lambda: GradientBoostingRegressor(random_state=0),
        "hgb-reg": lambda: HistGradientBoostingRegressor(random_state=0),
        "mlp-reg": scaled(MLPRegressor(hidden_layer_sizes=(64, 32), max_iter=300,
                                       random_state=0)),
        "svr": scaled(SVR()),
    }


def _p50_us(fn: Callable[[], Any], runs: int) -> float:
    fn()
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - t0
    return float(np.median(times)) / 1000.0


def compiler_bench(rows: int, features: int, only: tuple[str, ...], runs: int,
                   echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """Fit, compile and time each estimator; return one dict of figures per estimator."""
    from sklearn.datasets import make_classification, make_regression
    from sklearn.exceptions import ConvergenceWarning

    from compiler.compile import CompileOptions, compile_bundle
    from compiler.data import dataset_from_arrays
    from compiler.signing import generate_keys, load_private_key
    from edge_agent.bundle import load_public_key, read_bundle
    from edge_agent.model import BundleModel

    n_hold = max(rows // 5, 100)
    Xc, yc = make_classification(n_samples=rows + n_hold, n_features=features,
                                 n_informative=features // 2, random_state=0)
    Xr, yr = make_regression(n_samples=rows + n_hold, n_features=features, noise=10.0,
                             random_state=0)
    Xc, Xr = Xc.astype(np.float32), Xr.astype(np.float32)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        keys = generate_keys(Path(tmp) / "keys")
        key = load_private_key(keys.private_path)
        public = load_public_key(keys.public_path)
        for name, make in _estimators().items():
            if only and name not in only:
                continue
            is_clf = not name.endswith(("-reg", "linear", "ridge", "svr"))
            X, y = (Xc, yc) if is_clf else (Xr, yr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                warnings.filterwarnings("ignore", "The `probability` parameter", FutureWarning)
                t0 = time.perf_counter()
                model = make().fit(X[:rows], y[:rows])
                fit_s = time.perf_counter() - t0
            result = compile_bundle(
                model, dataset_from_arrays(X[:rows], y[:rows]),
                dataset_from_arrays(X[rows:], y[rows:], require_labels=True),
                name=name, version="1.0.0", signing_key=key, output=Path(tmp),
                options=CompileOptions(latency_runs=50),
            )
            served = BundleModel.from_bundle(read_bundle(result.path, [public]))
            row = X[rows:rows + 1]
            sk = model.predict_proba if is_clf else model.predict
            feeds = {served.session.get_inputs()[0].name: row}
            sk_us = _p50_us(functools.partial(sk, row), max(runs // 10, 20))
            raw_us = _p50_us(functools.partial(served.session.run, None, feeds), runs)
            dev_us = _p50_us(functools.partial(served.predict, row), runs)
            m = result.manifest
            entry = {
                "estimator": name, "fit_s": fit_s, "compile_s": result.seconds,
                "bundle_bytes": result.bundle_bytes, "parity": m.parity.max_abs_diff,
                "ties": m.parity.boundary_ties, "sklearn_us": sk_us, "ort_us": raw_us,
                "bundle_us": dev_us, "speedup": sk_us / raw_us,
            }
            results.append(entry)
            echo(_row(entry))
    return results


_HEADER = (f"{'estimator':<15} {'fit s':>6} {'compile s':>9} {'bundle B':>9} {'parity max':>10} "
           f"{'ties':>4} {'sklearn us':>10} {'ort us':>7} {'bundle us':>9} {'sk/ort':>7}")


def _row(e: dict[str, Any]) -> str:
    return (f"{e['estimator']:<15} {e['fit_s']:>6.1f} {e['compile_s']:>9.1f} "
            f"{e['bundle_bytes']:>9} {e['parity']:>10.2e} {e['ties']:>4} "
            f"{e['sklearn_us']:>10.0f} {e['ort_us']:>7.1f} {e['bundle_us']:>9.1f} "
            f"{e['speedup']:>6.0f}x")


@click.group()
def bench() -> None:
    """Benchmarks: figures and ratios measured against raw baselines in one run."""


@bench.command("compiler")
@click.option("--rows", default=10_000, show_default=True, type=click.IntRange(min=200))
@click.option("--features", default=16, show_default=True, type=click.IntRange(min=2))
@click.option("--only", multiple=True, help="Estimator name(s) to run (repeatable).")
@click.option("--runs", default=2000, show_default=True, type=click.IntRange(min=10),
              help="Single-row predictions per latency measurement.")
def compiler_command(rows: int, features: int, only: tuple[str, ...], runs: int) -> None:
    """Each supported estimator: compile time, bundle size, parity, single-row latency."""
    click.echo(f"compiler benchmark: {rows} training rows x {features} features, "
               f"single-row p50 latency over {runs} runs (sklearn: {max(runs // 10, 20)})")
    click.echo("sklearn us = predict_proba/predict; ort us = raw InferenceSession.run; "
               "bundle us = edgefleet device path (preprocess + run + decode)")
    click.echo(_HEADER)
    compiler_bench(rows, features, only, runs, click.echo)


@bench.command("agent")
@click.option("--quick", is_flag=True, help="Fewer iterations and 2 s wrk runs (smoke run).")
def agent_command(quick: bool) -> None:
    """Agent vs raw onnxruntime, plain FastAPI and numpy; cold start and RSS (issue 3)."""
    from edgefleet.bench_agent import agent_bench

    agent_bench(quick, click.echo)


@bench.command("hub")
@click.option("--messages", default=20_000, show_default=True, type=click.IntRange(min=100),
              help="Telemetry messages per ingestion run.")
@click.option("--devices", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--postgres-url", envvar="EDGEFLEET_TEST_POSTGRES_URL", default=None,
              help="A PostgreSQL server for the PostgreSQL runs (a scratch database is made "
                   "and dropped); default $EDGEFLEET_TEST_POSTGRES_URL, else skipped.")
def hub_command(messages: int, devices: int, postgres_url: str | None) -> None:
    """Hub ingestion vs a bare paho subscriber; bytes per device-hour vs CSV (issue 5)."""
    from edgefleet.bench_agent import format_table
    from edgefleet.bench_hub import hub_bench

    rows = hub_bench(messages, devices, postgres_url, click.echo)
    click.echo("")
    for line in format_table(rows):
        click.echo(line)


@bench.command("fleet-drift")
@click.option("--devices", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--hours", default=24, show_default=True, type=click.IntRange(min=1))
@click.option("--runs", default=7, show_default=True, type=click.IntRange(min=1))
@click.option("--db", type=click.Path(path_type=Path), default=None,
              help="Keep the database here (default: a temporary folder).")
def fleet_drift_command(devices: int, hours: int, runs: int, db: Path | None) -> None:
    """The fleet drift query over devices x hours of 5-minute windows x 16 features."""
    from edgefleet.bench_fleet_drift import main

    main(["--devices", str(devices), "--hours", str(hours), "--runs", str(runs)]
         + (["--db", str(db)] if db else []))
