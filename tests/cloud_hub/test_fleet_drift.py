"""Fleet drift: the rollup-backed query equals the plain merge of the windows it covers, ranks
a drifted device and its tag first, and keeps up with late and hostile windows."""

from __future__ import annotations

import math
import random
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_hub.errors import BundleNotFound, QueryError
from cloud_hub.fleet_drift import (
    HOUR,
    STRONG_SCORE,
    FleetDrift,
    chance_limit,
    fleet_drift,
    format_fleet_drift,
)
from cloud_hub.store import HubStore
from fleet_protocol import codec
from fleet_protocol import messages as msgs
from fleet_protocol.layouts import layouts_of
from fleet_protocol.manifest import BundleManifest
from fleet_protocol.sketch import Sketch
from fleet_protocol.verdict import judge_feature
from tests.cloud_hub import fleet

T0 = 472_222 * HOUR  # 2023-11-14 22:00 UTC


def _send(store: HubStore, items: list[tuple[str, msgs.WindowItem]], rng: random.Random,
          seqs: dict[str, int]) -> None:
    """Each window in its own envelope, batches of random size, in the given order."""
    batch: list[tuple[str, bytes]] = []
    for device, item in items:
        seqs[device] = seqs.get(device, 0) + 1
        batch.append(fleet.telemetry(device, seqs[device], [item]))
        if rng.random() < 0.3:
            store.ingest(batch, now=T0)
            batch = []
    if batch:
        store.ingest(batch, now=T0)


def _plain(manifest: BundleManifest, sent: list[fleet.Sent], since: float, until: float,
           devices: set[str] | None = None) -> dict[str, Any]:
    """The straightforward answer: Sketch.from_bytes of every covered window, merged."""
    lay_in, lay_out = layouts_of(manifest)
    key = fleet.key_of(lay_in, lay_out)
    h0, h1 = math.floor(since / HOUR) * HOUR, math.ceil(until / HOUR) * HOUR
    covered = [s for s in sent if h0 <= s.start < h1 and s.model_version == manifest.version
               and (devices is None or s.device_id in devices)]
    mine = [s for s in covered if s.layout == key]
    inputs, outputs = Sketch.empty(lay_in), Sketch.empty(lay_out)
    per_device: dict[str, list[Sketch]] = defaultdict(lambda: [Sketch.empty(lay_in),
                                                               Sketch.empty(lay_out)])
    for s in mine:
        a = Sketch.from_bytes(lay_in, s.inputs.to_bytes())
        b = Sketch.from_bytes(lay_out, s.outputs.to_bytes())
        inputs += a
        outputs += b
        per_device[s.device_id][0] += a
        per_device[s.device_id][1] += b
    # the result names the hours that hold windows of this version (any device or layout)
    held = [s.start for s in sent if h0 <= s.start < h1 and s.model_version == manifest.version]
    if held:
        h0 = math.floor(min(held) / HOUR) * HOUR
        h1 = (math.floor(max(held) / HOUR) + 1) * HOUR
    return {"since": h0, "until": h1, "windows": len(mine), "rows": sum(s.rows for s in mine),
            "skipped": len(covered) - len(mine), "inputs": inputs, "outputs": outputs,
            "per_device": per_device}


def _check_equal(result: FleetDrift, manifest: BundleManifest, plain: dict[str, Any]) -> None:
    base = manifest.baseline
    assert (result.since, result.until) == (plain["since"], plain["until"])
    assert (result.windows, result.rows, result.skipped_windows) == (
        plain["windows"], plain["rows"], plain["skipped"])
    ins, outs = plain["inputs"], plain["outputs"]
    want = [judge_feature(b, ins.feature_counts(j), base.min_evidence, int(ins.missing[j]))
            for j, b in enumerate(base.features)]
    want += [judge_feature(b, outs.feature_counts(j), base.min_evidence, int(outs.missing[j]))
             for j, b in enumerate(base.outputs)]
    assert list(result.features + result.outputs) == want
    assert result.reporting == len(plain["per_device"])
    most_missing = []
    for device, (s_in, _) in plain["per_device"].items():
        present = np.array([s_in.feature_counts(j).sum() for j in range(len(base.features))])
        total = present + s_in.missing
        rates = np.where(total > 0, s_in.missing / np.maximum(total, 1), 0.0)
        j = int(np.argmax(rates))
        if s_in.missing[j] > 0:
            most_missing.append((-rates[j], -int(s_in.missing[j]), device,
                                 base.features[j].name, int(total[j])))
    assert [(m.device_id, m.feature, m.missing, m.rows) for m in result.missing] == [
        (d, f, -m, n) for _, m, d, f, n in sorted(most_missing)]
    for d in result.devices:
        s_in, s_out = plain["per_device"][d.device_id]
        verdicts = [judge_feature(b, s_in.feature_counts(j), base.min_evidence)
                    for j, b in enumerate(base.features)]
        verdicts += [judge_feature(b, s_out.feature_counts(j), base.min_evidence)
                     for j, b in enumerate(base.outputs)]
        ratios = {v.name: max(v.psi / v.psi_threshold, v.js / v.js_threshold)  # type: ignore[operator]
                  for v in verdicts if v.status != "insufficient"}
        if not ratios:
            assert (d.score, d.status, d.drifted) == (None, "insufficient", ())
        else:
            assert d.score == pytest.approx(max(ratios.values()), rel=1e-9)
            over = sum(1 for x in ratios.values() if x > 1)
            assert d.judged == len(ratios)
            assert d.status == ("drift" if over >= chance_limit(len(ratios))
                                or max(ratios.values()) > STRONG_SCORE else "ok")
            assert d.drifted == tuple(sorted((f for f, x in ratios.items() if x > 1),
                                             key=lambda f: -ratios[f]))


@settings(max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), n_devices=st.integers(1, 4),
       n_windows=st.integers(0, 30), refresh_midway=st.booleans(),
       since=st.floats(0, 10 * HOUR), length=st.floats(1, 50 * HOUR))
def test_fleet_drift_equals_the_plain_merge_of_the_windows_it_covers(
        small_bundle: Any, seed: int, n_devices: int, n_windows: int, refresh_midway: bool,
        since: float, length: float) -> None:
    """Random windows (unaligned starts, any order, some late, some of another layout or
    version, some with missing values) over random hours: counts, missing and out-of-range
    counts, verdicts and per-device scores equal the plain merge of Sketch.from_bytes over
    the covered hours."""
    manifest = small_bundle.manifest
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    items: list[tuple[str, msgs.WindowItem]] = []
    sent: list[fleet.Sent] = []
    for _ in range(n_windows):
        device = f"pi-{pyrng.randrange(n_devices)}"
        start = T0 + pyrng.uniform(-HOUR, 40 * HOUR)
        kind = pyrng.random()
        if kind < 0.1:  # another layout of the same model version: skipped
            item, s = fleet.window(device, start, 150, rng, model_name="small",
                                   model_version="1.2.0")
        elif kind < 0.15:  # another version
            item, s = fleet.window(device, start, 150, rng, model_name="small",
                                   model_version="1.3.0")
        else:
            item, s = fleet.window(device, start, pyrng.randrange(0, 400), rng,
                                   manifest=manifest, tilt=pyrng.choice([0.0, 0.0, 2.0]),
                                   missing=pyrng.choice([0, 0, 3]))
        items.append((device, item))
        sent.append(s)
    with tempfile.TemporaryDirectory() as tmp, HubStore(path=Path(tmp) / "hub.db") as store:
        store.add_bundle(manifest)
        seqs: dict[str, int] = {}
        half = len(items) // 2
        _send(store, items[:half], pyrng, seqs)
        if refresh_midway:
            fleet_drift(store, model_name="small", model_version="1.2.0", since=T0,
                        until=T0 + 70 * HOUR)
        _send(store, items[half:], pyrng, seqs)
        result = fleet_drift(store, model_name="small", model_version="1.2.0",
                             since=T0 + since, until=T0 + since + length, top=100)
    _check_equal(result, manifest, _plain(manifest, sent, T0 + since, T0 + since + length))


def _drifting_fleet(store: HubStore, manifest: BundleManifest, hours: int = 3) -> None:
    """Six devices on three sites, 5-minute windows; pi-4 (site c) sees brighter inputs."""
    rng = np.random.default_rng(7)
    sites = {f"pi-{i}": "abc"[i // 2] for i in range(6)}
    store.ingest([fleet.state(d, tags={"site": s, "line": "1"}) for d, s in sites.items()],
                 now=T0)
    seqs: dict[str, int] = {}
    items = []
    for d in sites:
        for k in range(hours * 12):
            item, _ = fleet.window(d, T0 + 300.0 * k, 200, rng, manifest=manifest,
                                   tilt=3.0 if d == "pi-4" else 0.0)
            items.append((d, item))
    _send(store, items, random.Random(7), seqs)


def test_one_drifted_device_is_ranked_first_with_its_site(sqlite_store: HubStore,
                                                          small_bundle: Any) -> None:
    manifest = small_bundle.manifest
    sqlite_store.add_bundle(manifest)
    _drifting_fleet(sqlite_store, manifest)
    r = fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                    until=T0 + 3 * HOUR, top=3)
    assert (r.selected, r.reporting, r.windows, r.rows) == (6, 6, 216, 43_200)
    first = r.devices[0]
    assert (first.device_id, first.status, first.tags["site"]) == ("pi-4", "drift", "c")
    assert first.feature in {b.name for b in manifest.baseline.features}
    assert first.drifted[0] == first.feature
    assert first.score is not None and first.score > 1
    assert all(d.status == "ok" for d in r.devices[1:])
    assert len(r.devices) == 3
    # line=1 is on every device: it tells nothing and is not listed
    assert (r.tags[0].key, r.tags[0].value) == ("site", "c")
    assert all(t.key == "site" for t in r.tags)
    # the rest of the fleet, selected by site, is quiet
    quiet = fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                        until=T0 + 3 * HOUR, selector="site=a")
    assert (quiet.selected, quiet.reporting) == (2, 2)
    assert not quiet.drifted and {d.device_id for d in quiet.devices} == {"pi-0", "pi-1"}


def test_a_device_whose_sensor_stopped_is_listed_by_its_missing_rate(
        sqlite_store: HubStore, small_bundle: Any) -> None:
    """A device sending rows without values is not drift (drift is judged on the values that
    came) but is listed under "missing values", worst first; devices without any are not."""
    manifest = small_bundle.manifest
    sqlite_store.add_bundle(manifest)
    sqlite_store.ingest([fleet.state(d, tags={"site": "quiet" if d < "pi-2" else "loud"})
                         for d in ("pi-0", "pi-1", "pi-2", "pi-3")], now=T0)
    rng = np.random.default_rng(3)
    items = []
    for device, missing in (("pi-0", 0), ("pi-1", 0), ("pi-2", 50), ("pi-3", 3)):
        for k in range(4):
            item, _ = fleet.window(device, T0 + 300.0 * k, 150, rng, manifest=manifest,
                                   missing=missing)
            items.append((device, item))
    _send(sqlite_store, items, random.Random(3), {})
    r = fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                    until=T0 + HOUR)
    first = manifest.baseline.features[0].name  # every feature misses as often: the first
    assert [(m.device_id, m.feature, m.missing, m.rows) for m in r.missing] == [
        ("pi-2", first, 200, 800), ("pi-3", first, 12, 612)]
    assert r.missing[0].rate == 0.25
    assert r.features[0].missing == 212 and r.features[0].rows == 2400
    assert r.outputs[0].missing == 212  # the rollups' output missing counts, at their index
    assert r.rows == 2400 + 212 and {d.device_id: d.rows for d in r.devices}["pi-2"] == 800
    assert all(d.status != "drift" for d in r.devices)
    table = format_fleet_drift(r)
    section = table[table.index("missing values: "):].splitlines()
    assert section[2].split() == ["pi-2", "800", first, "25.0%"]
    assert section[3].split() == ["pi-3", "612", first, "2.0%"]
    quiet = fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                        until=T0 + HOUR, selector="site=quiet")
    assert quiet.reporting == 2 and quiet.missing == ()
    assert "missing values:" not in format_fleet_drift(quiet)


def test_a_window_days_late_lands_in_its_hour(sqlite_store: HubStore,
                                              small_bundle: Any) -> None:
    """A device offline for days sends old windows: the next query counts them."""
    manifest = small_bundle.manifest
    sqlite_store.add_bundle(manifest)
    rng = np.random.default_rng(1)
    items = [fleet.window("pi-1", T0 + 300.0 * k, 100, rng, manifest=manifest)[0]
             for k in range(3)]
    sqlite_store.ingest([fleet.telemetry("pi-1", 1, items[:2])], now=T0)
    before = fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                         until=T0 + HOUR)
    assert (before.windows, before.rows) == (2, 200)
    assert sqlite_store.refresh_rollups() == 0  # the query refreshed what it needed
    sqlite_store.ingest([fleet.telemetry("pi-1", 2, items[2:])], now=T0 + 3 * 86400)
    assert sqlite_store.refresh_rollups("small", "1.2.0") == 1
    after = fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                        until=T0 + HOUR)
    assert (after.windows, after.rows) == (3, 300)


def test_windows_with_lying_sketch_lengths_are_skipped_not_merged(
        sqlite_store: HubStore, small_bundle: Any) -> None:
    """A device sends sketches that decode alone but not at the layout's lengths: its windows
    are counted as skipped, the rest of the fleet is judged as usual."""
    manifest = small_bundle.manifest
    sqlite_store.add_bundle(manifest)
    rng = np.random.default_rng(2)
    good, _ = fleet.window("pi-1", T0, 150, rng, manifest=manifest)
    lay_in, _ = layouts_of(manifest)
    n_numeric = sum(f.kind == "numeric" for f in lay_in.features)
    liar_bytes = codec.encode_sketch(
        lay_in.fingerprint(), np.ones(lay_in.total_slots + 1, dtype=np.int64),
        np.zeros(lay_in.n_features, dtype=np.int64),
        np.tile([1.0, 0.0, 0.0, 0.0, 0.0], (n_numeric, 1)))
    liar = good.model_copy(update={"inputs": liar_bytes})
    r = sqlite_store.ingest([fleet.telemetry("pi-1", 1, [good]),
                             fleet.telemetry("pi-2", 1, [liar])], now=T0)
    assert r.stored == 2
    result = fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                         until=T0 + HOUR)
    assert (result.windows, result.skipped_windows, result.reporting) == (1, 1, 1)


def test_query_errors(sqlite_store: HubStore, small_bundle: Any) -> None:
    with pytest.raises(BundleNotFound, match=r"small 1\.2\.0 was never added"):
        fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                    until=T0 + HOUR)
    sqlite_store.add_bundle(small_bundle.manifest)
    with pytest.raises(QueryError, match="must be after since"):
        fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                    until=T0)
    with pytest.raises(QueryError, match="top 0"):
        fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                    until=T0 + 1, top=0)
    empty = fleet_drift(sqlite_store, model_name="small", model_version="1.2.0", since=T0,
                        until=T0 + 1)
    assert (empty.windows, empty.devices, empty.until - empty.since) == (0, (), HOUR)
    assert all(v.status == "insufficient" for v in empty.features)


def test_fleet_drift_on_postgres(pg_database: str, small_bundle: Any) -> None:
    """The same query on PostgreSQL: the drifted device first, sums equal the plain merge."""
    manifest = small_bundle.manifest
    with HubStore(pg_database) as store:
        store.add_bundle(manifest)
        _drifting_fleet(store, manifest, hours=2)
        r = fleet_drift(store, model_name="small", model_version="1.2.0", since=T0,
                        until=T0 + 2 * HOUR)
    assert (r.windows, r.rows, r.devices[0].device_id) == (144, 28_800, "pi-4")


def test_chance_limit_is_the_binomial_tail() -> None:
    """A device drifts when more features drift than chance explains 1% of the time."""
    from scipy.stats import binom

    from cloud_hub.fleet_drift import chance_limit

    for n in (1, 2, 6, 16, 66, 200):
        k = chance_limit(n)
        assert binom.sf(k - 1, n, 0.01) <= 0.01  # P(X >= k)
        assert k == 1 or binom.sf(k - 2, n, 0.01) > 0.01  # and k - 1 would not do
    assert chance_limit(66) == 4 and chance_limit(16) == 3
