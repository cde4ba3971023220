"""`edgefleet agent ...`: run the daemon (and its sync to the hub), warm numba's cache (and
build the sketch kernels ahead of time), look at status, drift and the outbox offline, score
files in batch.

Heavy modules are imported inside the commands, after ``NUMBA_CACHE_DIR`` points into the data
dir: numba picks its cache folder when a kernel module is imported.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from edge_agent.config import AgentConfig, load_config

__all__ = ["agent"]

CONFIG_OPTION = click.option(
    "-c", "--config", "config_path", type=click.Path(path_type=Path), default=None,
    envvar="EDGEFLEET_AGENT_CONFIG", help="agent.toml (env overrides: EDGEFLEET_AGENT_*).")


#: glibc's mallopt parameter for the most malloc arenas (malloc.h)
_M_ARENA_MAX = -8


def _cap_malloc_arenas(environ: Mapping[str, str], arenas: int = 2) -> None:
    """At most ``arenas`` glibc malloc arenas from here on, unless MALLOC_ARENA_MAX is set.

    glibc gives a thread that finds its arena busy an arena of its own (up to 8 per core),
    and memory freed in one arena serves only the threads on it. Serving an RF100 bundle on
    a 2-vCPU VM (300 requests, then a flush), `agent run` ended at 276 MiB in 6 runs of 10
    and at 314-334 MiB in the other 4; with two arenas, at 276 MiB in 8 of 8, and wrk at 8
    connections showed no change in throughput or latency beyond the noise. A no-op without
    glibc. Call it before the agent starts its threads.
    """
    if "MALLOC_ARENA_MAX" in environ:
        return  # glibc read it at start; the operator's value stands
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    mallopt(_M_ARENA_MAX, arenas)


def _config(path: Path | None) -> AgentConfig:
    config = load_config(path)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(config.numba_cache_dir))
    return config


@click.group()
def agent() -> None:
    """The device agent: serve a bundle offline and record what the fleet needs."""


@agent.command("run")
@CONFIG_OPTION
def run_command(config_path: Path | None) -> None:
    """Serve the configured bundle until SIGTERM (HTTP API on the configured port)."""
    config = _config(config_path)
    _cap_malloc_arenas(os.environ)
    from edge_agent.agent import Agent
    from edge_agent.errors import NotReadyError

    instance = Agent(config)
    try:
        if not instance.ready:
            raise NotReadyError(
                "nothing to serve: " + ("; ".join(instance.refusals) or "no bundle configured "
                                        "and none installed (set `bundle` in the config)"))
        blue = instance.serving()
        # The daemon's start-up heap (onnxruntime, numpy, pydantic, the loaded bundle) lives
        # as long as the process: frozen, the cyclic collector stops walking it again on each
        # full collection (sustained 1024-row batches: ~5% of the serving thread's CPU)
        gc.collect()
        gc.freeze()
        click.echo(f"serving {blue.name} {blue.version} (device {config.device_id}, data "
                   f"{config.data_dir})", err=True)
        if instance.sync is not None:
            click.echo(f"syncing to {instance.sync.settings.url} (outbox quota "
                       f"{config.sync.quota_bytes} bytes)", err=True)
        if config.http.enabled:
            from edge_agent.http_api import serve_forever

            serve_forever(instance, config.http.host, config.http.port)
        else:
            signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        instance.close()


@agent.command("warmup")
@CONFIG_OPTION
def warmup_command(config_path: Path | None) -> None:
    """Compile the kernels into the data dir so restarts skip the JIT: numba's cache for the
    preprocessing kernels, and the sketch kernels ahead of time, so the agent folds without
    numba in memory (this needs a C compiler and the Python headers; without them the agent
    uses numba's JIT for the sketches too, and holds ~100 MiB more)."""
    _config(config_path)
    cache_dir = Path(os.environ["NUMBA_CACHE_DIR"])  # the folder `agent run` will look in
    t0 = time.perf_counter()
    from edge_agent import preprocess, sketch_aot, sketching

    preprocess.warmup()
    build = sketch_aot.build(cache_dir)
    if build.error is None:
        click.echo(f"sketch kernels: ahead-of-time build {build.path} "
                   + (f"(built in {build.seconds:.1f}s)" if build.built else "(up to date)"))
    else:
        click.echo(f"warning: sketch kernels not built ahead of time: {build.error}. The agent "
                   "folds with numba's JIT instead (works; ~100 MiB more resident).", err=True)
    sketching.warmup()  # loads the build (or compiles the JIT's cache) as the first fold will
    click.echo(f"numba kernels compiled into {cache_dir} in {time.perf_counter() - t0:.1f}s")


def _store(config: AgentConfig) -> Any:
    from edge_agent.store import AgentStore

    if not config.db_path.exists():
        raise click.ClickException(
            f"no agent database at {config.db_path}; has `edgefleet agent run` started here?")
    return AgentStore(config.db_path)


@agent.command("status")
@CONFIG_OPTION
def status_command(config_path: Path | None) -> None:
    """Current models, health of the last windows, recent refusals (offline)."""
    config = _config(config_path)
    store = _store(config)
    try:
        slots = store.slots()
        click.echo(f"device      {config.device_id}")
        for slot in ("blue", "green"):
            rec = slots.get(slot)
            click.echo(f"{slot:<11} " + (f"{rec.name} {rec.version} (sha256 {rec.sha256[:12]}..."
                                         f", installed {_ts(rec.installed_at)})" if rec else "-"))
        kept, oldest = store.prediction_horizon()
        limit = config.telemetry.keep_predictions
        click.echo(f"predictions {kept} logged (keep_predictions {limit})"
                   + ("" if oldest is None else f", since {_ts(oldest)} "
                      f"({_age(time.time() - oldest)} ago): feedback reaches that far back"))
        windows = store.windows()[-6:]
        if windows:
            click.echo(f"\n{'window start':<20} {'model':<18} {'requests':>8} {'errors':>6} "
                       f"{'p50 us':>8} {'p99 us':>8} {'rss MB':>7} state")
        for w in windows:
            m = w.metrics
            rss = m.get("rss_bytes")
            click.echo(
                f"{_ts(w.start):<20} {(w.model_name + ' ' + w.model_version)[:18]:<18} "
                f"{m['requests']:>8} {m['errors']:>6} {_num(m.get('latency_p50_us')):>8} "
                f"{_num(m.get('latency_p99_us')):>8} "
                f"{(rss / 1e6 if rss else 0):>7.0f} {'closed' if w.closed else 'open'}")
        refusals = store.events(["bundle_refused", "concept_drift"])[-5:]
        for e in refusals:
            click.echo(f"{_ts(e['ts'])} {e['kind']}: {e['detail']}")
    finally:
        store.close()


@agent.command("outbox")
@CONFIG_OPTION
def outbox_command(config_path: Path | None) -> None:
    """What waits for the hub: pending rows and bytes, batches in flight, drops, last receipt."""
    config = _config(config_path)
    from edge_agent.outbox import KINDS, outbox_status

    store = _store(config)
    try:
        st = outbox_status(store)
    finally:
        store.close()
    sync = config.sync
    click.echo(f"device      {config.device_id}")
    off = "- (sync is off: nothing is added to the outbox)"
    click.echo(f"broker      {sync.broker_url if sync.enabled else off}")
    click.echo(f"pending     {st.rows} rows, {st.bytes} bytes (quota {sync.quota_bytes}), "
               f"{st.unbatched_rows} not yet in a message"
               + (f", oldest {_ts(st.oldest_created_at)}" if st.oldest_created_at else ""))
    for kind in KINDS:
        rows, size = st.by_kind.get(kind, (0, 0))
        click.echo(f"  {kind:<9} {rows:>8} rows {size:>12} bytes")
    n = len(st.inflight)
    inflight = ("none" if not n else f"seq {st.inflight[0]} (1 message)" if n == 1
                else f"seq {st.inflight[0]}-{st.inflight[-1]} ({n} messages)")
    click.echo(f"in flight   {inflight}; last seq formed {st.last_seq}")
    click.echo(f"receipt     up to seq {st.last_receipt_seq}"
               + (f" at {_ts(st.last_receipt_at)}" if st.last_receipt_at else " (none yet)"))
    drops = ", ".join(f"{n} {k}" for k, n in sorted(st.drops_total.items())) or "none"
    unreported = ", ".join(f"{n} {k}" for k, n in sorted(st.drops_unreported.items()))
    click.echo(f"dropped     {drops}" + (f" ({unreported} not yet reported)" if unreported
                                          else ""))


def _ts(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _age(seconds: float) -> str:
    """A duration as the largest unit that keeps it readable: 45 s, 12 min, 5.2 h, 3.1 days."""
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}"


@agent.command("drift")
@CONFIG_OPTION
@click.option("--minutes", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Merge the windows of this many last minutes.")
def drift_command(config_path: Path | None, minutes: float) -> None:
    """Per-feature drift of the serving model against its calibrated baseline (offline)."""
    config = _config(config_path)
    from edge_agent.bundle import load_public_key, read_bundle
    from edge_agent.drift_report import drift_table

    store = _store(config)
    try:
        blue = store.slots().get("blue")
        if blue is None:
            raise click.ClickException("no model installed")
        manifest = read_bundle(blue.path, [load_public_key(p) for p in config.trusted_keys]
                               ).manifest
        since = time.time() - minutes * 60
        windows = [w for w in store.windows(model_version=blue.version)
                   if w.end > since and w.model_name == blue.name]
        click.echo(drift_table(manifest, windows))
    finally:
        store.close()


@agent.command("batch")
@click.argument("input_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("-o", "--output", "output_file", required=True, type=click.Path(path_type=Path))
@CONFIG_OPTION
@click.option("--chunk-rows", default=4096, show_default=True, type=click.IntRange(1, 1_000_000))
def batch_command(input_file: Path, output_file: Path, config_path: Path | None,
                  chunk_rows: int) -> None:
    """Score a CSV (or Parquet, with pyarrow) file in chunks; write predictions to OUTPUT."""
    config = _config(config_path)
    from edge_agent.agent import Agent
    from edge_agent.batch import score_file

    instance = Agent(config)
    try:
        rows = score_file(instance, input_file, output_file, chunk_rows=chunk_rows,
                          progress=sys.stderr.isatty())
    finally:
        instance.close()
    click.echo(f"scored {rows} rows -> {output_file}", err=True)


def _send_swap(config: AgentConfig, body: dict[str, Any]) -> None:
    """POST a swap command to the running agent's local API; print its answer."""
    import json
    import urllib.error
    import urllib.request
    import uuid

    body.setdefault("id", f"cli-{uuid.uuid4().hex[:12]}")
    host = "127.0.0.1" if config.http.host in ("0.0.0.0", "::", "") else config.http.host
    url = f"http://{host}:{config.http.port}/v1/swap"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        answer = json.loads(err.read() or b"{}")
        if "error" in answer:
            raise click.ClickException(answer["error"]) from None
    except urllib.error.URLError as err:
        raise click.ClickException(
            f"cannot reach the agent at {url} ({err.reason}); is `edgefleet agent run` up?"
        ) from None
    state = answer["state"]
    click.echo(f"{body['command']} {body['id']}: {answer['outcome']} — {answer['reason']}")
    click.echo(f"phase {answer['phase']}, blue {state['blue_version']}, "
               f"green {state['green_version'] or '-'}")
    if answer["outcome"] == "refused":
        raise SystemExit(1)


ID_OPTION = click.option("--id", "command_id", default=None,
                         help="Command id (repeating an id does nothing new). Default: random.")


@agent.command("stage")
@click.argument("source")
@CONFIG_OPTION
@ID_OPTION
@click.option("--version", "version", default=None, help="Expected version (checked).")
@click.option("--force", is_flag=True, help="Allow a downgrade / reset the rollback-loop guard.")
def stage_command(source: str, config_path: Path | None, command_id: str | None,
                  version: str | None, force: bool) -> None:
    """Download, verify and load SOURCE (bundle file or URL) into the green slot."""
    body: dict[str, Any] = {"command": "stage", "source": source, "force": force}
    if version:
        body["version"] = version
    if command_id:
        body["id"] = command_id
    _send_swap(_config(config_path), body)


def _simple(name: str, help_text: str) -> None:
    @agent.command(name, help=help_text)
    @CONFIG_OPTION
    @ID_OPTION
    def command(config_path: Path | None, command_id: str | None) -> None:
        body: dict[str, Any] = {"command": name}
        if command_id:
            body["id"] = command_id
        _send_swap(_config(config_path), body)


_simple("shadow", "Run green beside blue on live traffic (blue still answers).")
_simple("promote", "Let green answer; blue stays loaded until commit.")
_simple("commit", "Make green the new blue and unload the old one.")
_simple("rollback", "Go back to blue and drop green.")


@agent.command("swap-status")
@CONFIG_OPTION
def swap_status_command(config_path: Path | None) -> None:
    """The blue-green state machine's phase, slots and last decision (offline)."""
    config = _config(config_path)
    store = _store(config)
    try:
        raw = store.load_swap_state()
        slots = store.slots()
        rollbacks = store.events(["rolled_back"])
    finally:
        store.close()
    if raw is None:
        click.echo("no swap state yet (the agent has not started)")
        return
    click.echo(f"phase       {raw['phase']} (cycle {raw['cycle']})")
    for slot in ("blue", "green"):
        rec = slots.get(slot)
        click.echo(f"{slot:<11} " + (f"{rec.name} {rec.version}" if rec else "-"))
    click.echo(f"committed   {raw['committed_version']}")
    click.echo(f"last        {raw['last_reason']}"
               + (f" {raw['last_numbers']}" if raw.get("last_numbers") else ""))
    click.echo(f"rollbacks   {raw['rollback_count']} in all")
    if rollbacks:
        last = rollbacks[-1]
        click.echo(f"last cause  {_ts(last['ts'])}: {last['detail'].get('cause', '-')}")
