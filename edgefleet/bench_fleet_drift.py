"""Benchmark the hub's fleet drift query (issue 5): 1,000 devices x 24 h of 5-minute windows
x 16 features on SQLite, against the 300 ms target.

    scripts/bench fleet-drift [--devices 1000] [--hours 24] [--db PATH]

Steps, each timed: compile a real 16-feature bundle; tag the devices through real state
messages (10 sites; the 100 devices of site s7 see brighter inputs); encode one envelope per
device-hour holding its 12 windows (48 distinct sketch pairs reused, real bytes in the bundle's
layouts); ingest them through ``HubStore.ingest`` in batches of 50 envelopes (fill time);
rebuild every rollup from the raw windows (``refresh_rollups`` from scratch); then time
``fleet_drift`` over the last 24 h (an unaligned range: 25 whole hours, a few rollup buckets per
device), median of several runs, with and without a selector; then once after a window arrives
late, and the live case: every device closes one more window, refreshed in the background (as
a hub worker would) or by the next query. The plain way — ``Sketch.from_bytes`` of every
window, merged — is timed on a sample and extrapolated, for the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = 16
ROWS = 3000  # a 5-minute window at 10 predictions/s
WINDOW = 300.0
HOUR = 3600
#: one outbox stream per simulated device database (never reset in the bench)
BENCH_STREAM = "be4c4be4c4be4c4b"
T0 = 472_222 * HOUR  # an hour boundary (2023-11-14 22:00 UTC)
DISTINCT = 48
BATCH = 50
TARGET_MS = 300.0


def compile_bundle(workdir: Path) -> Any:
    """A real bundle: StandardScaler + LogisticRegression over 16 features."""
    from sklearn.datasets import make_classification
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from compiler.compile import CompileOptions, compile_bundle
    from compiler.data import dataset_from_arrays
    from compiler.signing import generate_keys, load_private_key

    X, y = make_classification(n_samples=3000, n_features=FEATURES, n_informative=8,
                               random_state=0)
    X = X.astype(np.float32)
    keys = generate_keys(workdir / "keys")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X[:2000], y[:2000])
    return compile_bundle(
        model, dataset_from_arrays(X[:2000], y[:2000], source="train"),
        dataset_from_arrays(X[2000:], y[2000:], source="holdout", require_labels=True),
        name="bench", version="1.0.0", signing_key=load_private_key(keys.private_path),
        output=workdir, options=CompileOptions(resamples=100, latency_runs=20))


def window_sketches(manifest: Any, rng: np.random.Generator, tilt: float) -> tuple[bytes, bytes]:
    """One window's input and output sketch bytes, drawn from the baseline (tilted: drift)."""
    from fleet_protocol.drift import bin_positions
    from fleet_protocol.layouts import layouts_of
    from fleet_protocol.sketch import Sketch

    out = []
    for layout, baselines, t in zip(layouts_of(manifest), (manifest.baseline.features,
                                                            manifest.baseline.outputs),
                                    (tilt, 0.0), strict=True):
        s = Sketch.empty(layout)
        for j, (f, b) in enumerate(zip(layout.features, baselines, strict=True)):
            p = (np.asarray(b.counts, dtype=np.float64) + 0.5)
            p *= np.exp(t * np.arange(f.n_slots) / f.n_slots)
            slots = rng.choice(f.n_slots, size=ROWS, p=p / p.sum())
            if f.kind == "numeric":
                s.update_numeric(j, bin_positions(f.edges)[slots])
            else:
                s.update_codes(j, slots)
        out.append(s.to_bytes())
    return out[0], out[1]


def _median_ms(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def fleet_drift_bench(devices: int, hours: int, runs: int, db: Path | None,
                      echo: Callable[[str], None]) -> list[tuple[str, str, str]]:
    """Run the benchmark; the table rows (figure, measured, target)."""
    from cloud_hub.fleet_drift import fleet_drift, format_fleet_drift
    from cloud_hub.store import HubStore
    from fleet_protocol import messages as msgs
    from fleet_protocol import topics, wire
    from fleet_protocol.layouts import layout_key, layouts_of
    from fleet_protocol.sketch import Sketch

    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        bundle = compile_bundle(work)
        manifest = bundle.manifest
        echo(f"compiled {manifest.name} {manifest.version} ({FEATURES} features) in "
             f"{time.perf_counter() - t:.1f}s")
        rng = np.random.default_rng(0)
        normal = [window_sketches(manifest, rng, 0.0) for _ in range(DISTINCT)]
        bright = [window_sketches(manifest, rng, 2.5) for _ in range(DISTINCT)]
        key = layout_key(manifest)
        sites = [f"s{i % 10}" for i in range(devices)]
        names = [f"dev-{i:04d}" for i in range(devices)]

        t = time.perf_counter()
        payloads: list[tuple[str, bytes]] = []
        for d, name in enumerate(names):
            pool = bright if sites[d] == "s7" else normal
            for h in range(hours):
                items = []
                for k in range(12):
                    start = T0 + h * HOUR + k * WINDOW
                    s_in, s_out = pool[(d * 7 + h * 12 + k) % DISTINCT]
                    items.append(msgs.window_item_from(
                        model_name="bench", model_version="1.0.0", slot="blue", start=start,
                        end=start + WINDOW, layout=key, inputs=s_in, outputs=s_out,
                        metrics={"requests": ROWS}, rows=ROWS))
                env = msgs.TelemetryEnvelope(
                    device_id=name, stream=BENCH_STREAM, message_id=msgs.new_message_id(),
                    seq=h + 1,
                    sent_at=T0 + (h + 1) * HOUR, agent_version="0.1.0", items=tuple(items))
                payloads.append((topics.telemetry(name), wire.encode(env)))
        n_windows = devices * hours * 12
        echo(f"encoded {len(payloads)} envelopes ({n_windows} windows) in "
             f"{time.perf_counter() - t:.1f}s (the devices' work, not timed below)")

        path = db or work / "hub.db"
        path.unlink(missing_ok=True)
        with HubStore(path=path) as store:
            store.add_bundle(manifest)
            states = [(topics.state(n), wire.encode(msgs.StateMessage(
                device_id=n, online=True, agent_version="0.1.0", swap_phase="idle",
                tags={"site": sites[d], "cohort": "c" + str(d % 3)}, ts=T0)))
                for d, n in enumerate(names)]
            store.ingest(states, now=T0)
            t = time.perf_counter()
            for i in range(0, len(payloads), BATCH):
                store.ingest(payloads[i:i + BATCH], now=T0 + hours * HOUR)
            fill = time.perf_counter() - t
            rows.append((f"fill: ingest {n_windows:,} windows ({len(payloads):,} envelopes, "
                         f"batches of {BATCH})",
                         f"{fill:.1f} s ({n_windows / fill:,.0f} windows/s)", "-"))
            t = time.perf_counter()
            buckets = store.refresh_rollups()
            refresh = time.perf_counter() - t
            rows.append((f"rollup refresh from scratch ({buckets:,} device-hours)",
                         f"{refresh:.1f} s", "-"))

            until = T0 + hours * HOUR + 1020.0  # "now": 17 minutes past the hour
            since = until - 24 * HOUR

            def query(selector: str | None = None) -> Any:
                return fleet_drift(store, model_name="bench", model_version="1.0.0",
                                   since=since, until=until, selector=selector)

            result = query()
            assert result.windows == min(hours, 24) * 12 * devices, result.windows
            ms = _median_ms(query, runs)
            rows.append((f"fleet_drift 24 h, {devices:,} devices (median of {runs})",
                         f"{ms:.0f} ms", f"< {TARGET_MS:.0f} ms "
                         f"{'ok' if ms < TARGET_MS else 'MISSED'}"))
            ms_sel = _median_ms(lambda: query("site=s7"), runs)
            rows.append(("fleet_drift 24 h, selector site=s7", f"{ms_sel:.0f} ms", "-"))
            late = msgs.TelemetryEnvelope(
                device_id=names[0], stream=BENCH_STREAM, message_id=msgs.new_message_id(),
                seq=hours + 1,
                sent_at=until, agent_version="0.1.0", items=(msgs.window_item_from(
                    model_name="bench", model_version="1.0.0", slot="blue",
                    start=T0 + 5 * HOUR + 150, end=T0 + 5 * HOUR + 450, layout=key,
                    inputs=normal[0][0], outputs=normal[0][1], metrics={}, rows=ROWS),))
            store.ingest([(topics.telemetry(names[0]), wire.encode(late))], now=until)
            t = time.perf_counter()
            query()
            rows.append(("fleet_drift right after 1 late window (refresh included)",
                         f"{(time.perf_counter() - t) * 1000:.0f} ms", "-"))

            # a live fleet: every device closes one more window in the current hour; the hub
            # worker refreshes in the background, or the next query pays for it
            for round_ in range(2):
                live = []
                for d, name in enumerate(names):
                    start = T0 + hours * HOUR + round_ * WINDOW
                    s_in, s_out = (bright if sites[d] == "s7" else normal)[d % DISTINCT]
                    env = msgs.TelemetryEnvelope(
                        device_id=name, stream=BENCH_STREAM, message_id=msgs.new_message_id(),
                        seq=hours + 2 + round_, sent_at=until, agent_version="0.1.0",
                        items=(msgs.window_item_from(
                            model_name="bench", model_version="1.0.0", slot="blue",
                            start=start, end=start + WINDOW, layout=key, inputs=s_in,
                            outputs=s_out, metrics={}, rows=ROWS),))
                    live.append((topics.telemetry(name), wire.encode(env)))
                for i in range(0, len(live), BATCH):
                    store.ingest(live[i:i + BATCH], now=until)
                t = time.perf_counter()
                if round_ == 0:
                    n = store.refresh_rollups()
                    rows.append((f"rollup refresh after 1 new window per device ({n:,} "
                                 "device-hours)", f"{(time.perf_counter() - t) * 1000:,.0f} ms",
                                 "-"))
                else:
                    query()
                    rows.append(("fleet_drift right after 1 new window per device (refresh "
                                 "included)", f"{(time.perf_counter() - t) * 1000:,.0f} ms",
                                 "-"))

            lay_in, lay_out = layouts_of(manifest)
            sample = [p for pair in (normal + bright) for p in [pair]] * 50
            t = time.perf_counter()
            acc_in, acc_out = Sketch.empty(lay_in), Sketch.empty(lay_out)
            for s_in, s_out in sample:
                acc_in += Sketch.from_bytes(lay_in, s_in)
                acc_out += Sketch.from_bytes(lay_out, s_out)
            plain = (time.perf_counter() - t) / len(sample) * n_windows
            rows.append(("plain merge of the same windows (Sketch.from_bytes, extrapolated "
                         f"from {len(sample):,})", f"{plain:.1f} s ({plain * 1000 / ms:,.0f}x "
                         "the query)", "-"))
            size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
            rows.append(("hub database on disk (windows + rollups)", f"{size / 1e6:,.0f} MB",
                         "-"))
            echo("")
            echo(format_fleet_drift(result, top=5))
            echo("")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--db", type=Path, default=None,
                        help="keep the database here (default: a temporary folder)")
    args = parser.parse_args(argv)
    echo = print
    echo(f"fleet drift benchmark: {args.devices} devices x {args.hours} h of 5-minute windows "
         f"x {FEATURES} features, {ROWS} rows per window, SQLite (WAL, synchronous=FULL)")
    rows = fleet_drift_bench(args.devices, args.hours, args.runs, args.db, echo)
    width = max(len(r[0]) for r in rows)
    echo(f"{'figure':<{width}}  {'measured':<28}  target")
    for figure, measured, target in rows:
        echo(f"{figure:<{width}}  {measured:<28}  {target}")


if __name__ == "__main__":
    main()
