"""`edgefleet hub ...`: run the hub's ingestion (`serve`) and add bundles to its store.

Errors of cloud_hub (and a broker that cannot start) become one ``error:`` line on stderr and
exit code 1, here at the edge.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from cloud_hub.config import HubConfig, HubConfigError, load_config
from cloud_hub.errors import CloudHubError
from cloud_hub.mosquitto import BrokerError

__all__ = ["hub"]

log = logging.getLogger(__name__)

CONFIG_OPTION = click.option(
    "-c", "--config", "config_path", type=click.Path(path_type=Path), default=None,
    envvar="EDGEFLEET_HUB_CONFIG", help="hub.toml (env overrides: EDGEFLEET_HUB_*).")
DB_OPTION = click.option(
    "--db", default=None, help="Store: postgresql://user@host/db, sqlite:///path or a file "
    "path (default: $EDGEFLEET_HUB_DB, else ~/.local/share/edgefleet/hub.db).")


class _HubGroup(click.Group):
    """Turns the hub's errors into one ``error:`` line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (CloudHubError, BrokerError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)


@click.group(cls=_HubGroup)
def hub() -> None:
    """The fleet side: ingest what devices send over MQTT, answer with receipts."""


def _open_store(config: HubConfig) -> Any:
    from cloud_hub.store import open_store

    return open_store(config.db)


@hub.command("serve")
@CONFIG_OPTION
@DB_OPTION
@click.option("--broker", "broker_url", default=None,
              help="mqtt://host:port of the broker (default: start the embedded broker).")
@click.option("--group", default=None, help="Shared-subscription group (default: hub).")
@click.option("--client-id", default=None,
              help="MQTT client id, stable per hub process (default: edgefleet-hub-<group>-"
              "<hostname>).")
@click.option("--workers", default=None, type=click.IntRange(1, 64),
              help="Workers in this process, each with its own MQTT session (default: 1).")
def serve_command(config_path: Path | None, db: str | None, broker_url: str | None,
                  group: str | None, client_id: str | None, workers: int | None) -> None:
    """Ingest device messages into the store and publish receipts, until SIGTERM or SIGINT."""
    config = load_config(config_path, overrides={
        "db": db, "broker.url": broker_url, "broker.group": group,
        "broker.client_id": client_id, "ingest.workers": workers})
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_hub(config, stop, echo=lambda text: click.echo(text, err=True))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _refresh_rollups(store: Any) -> None:
    """Fold what was stored since the last time into the drift rollups; a failure is logged
    and retried at the next tick (ingestion goes on regardless)."""
    try:
        n = store.refresh_rollups()
    except CloudHubError as err:
        log.warning("drift rollup refresh failed (retried later): %s", err)
        return
    if n:
        log.info("drift rollups: %d hour bucket(s) refreshed", n)


def run_hub(config: HubConfig, stop: threading.Event, *, echo: Any = print,
            ready: threading.Event | None = None) -> None:
    """Run the hub of ``config`` until ``stop`` is set: store, broker (embedded when no URL is
    configured), workers; then stop the workers (their queued batches stored and receipted),
    the broker and the store, in that order. ``ready`` is set once every worker subscribed."""
    from cloud_hub.worker import HubWorker, default_client_id, settle_heap

    b = config.broker
    embedded = b.url is None
    if embedded and config.ingest.workers > 1:
        raise HubConfigError(
            f"config key ingest.workers = {config.ingest.workers}: the embedded broker has no "
            "shared subscriptions, so every worker would get every message; run one worker, "
            "or configure broker.url (Mosquitto: devices/mosquitto/)")
    password = b.password_text()
    stores: list[Any] = []
    workers: list[HubWorker] = []
    broker: Any = None
    try:
        for _ in range(config.ingest.workers):
            stores.append(_open_store(config))
        if embedded:
            from cloud_hub.embedded_broker import EmbeddedBroker

            e = config.embedded_broker
            broker = EmbeddedBroker(host=e.host, port=e.port or None).start()
            url = broker.url
            echo(f"embedded MQTT broker (amqtt, MQTT 3.1.1, no authentication) listening on "
                 f"{url}; for production configure broker.url (Mosquitto: devices/mosquitto/)")
        else:
            assert b.url is not None
            url = b.url
        n = config.ingest.workers
        base_id = b.client_id or default_client_id(b.group)
        for i, store in enumerate(stores):
            try:
                worker = HubWorker(
                    store, broker_url=url, group=b.group,
                    client_id=base_id if n == 1 else f"{base_id}-{i}",
                    username=b.username, password=password, ca_certs=b.ca_certs,
                    certfile=b.certfile, keyfile=b.keyfile,
                    mqtt_version=311 if embedded else b.mqtt_version,
                    shared=False if embedded else b.shared,
                    batch_max=config.ingest.batch_max,
                    batch_wait=config.ingest.batch_wait_seconds,
                    inflight=config.ingest.inflight, session_expiry=b.session_expiry_seconds,
                    keepalive=b.keepalive_seconds)
            except ValueError as err:
                raise HubConfigError(f"cannot configure worker {i}: {err}") from err
            workers.append(worker)
        settle_heap()
        for worker in workers:
            worker.start()
        echo(f"hub: {n} worker(s) ingesting from {url} into {stores[0].describe()} "
             f"(client ids: {', '.join(w.client_id for w in workers)})")
        announced = False
        every = config.ingest.rollup_refresh_seconds
        next_refresh = time.monotonic() + every
        while not stop.is_set():
            if not announced and all(w.wait_subscribed(0) for w in workers):
                announced = True
                echo(f"hub: subscribed to {', '.join(workers[0].filters)}")
                if ready is not None:
                    ready.set()
            if every and time.monotonic() >= next_refresh:
                _refresh_rollups(stores[0])
                next_refresh = time.monotonic() + every
            stop.wait(0.2)
        echo("hub: stopping (storing and receipting what is queued)")
    finally:
        for w in workers:
            w.stop()
        if broker is not None:
            broker.stop()
        for s in stores:
            s.close()
    for w in workers:
        st = w.stats()
        echo(f"hub: worker {w.client_id}: {st['received']} received, {st['stored']} stored, "
             f"{st['duplicates']} duplicates, {st['rejected']} rejected, "
             f"{st['receipts_sent']} receipts")


@hub.command("add-bundle")
@click.argument("path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--trusted-key", "trusted_keys", multiple=True, required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Ed25519 public key the bundle must be signed by (repeatable).")
@CONFIG_OPTION
@DB_OPTION
def add_bundle_command(path: Path, trusted_keys: tuple[Path, ...], config_path: Path | None,
                       db: str | None) -> None:
    """Verify a signed .edgebundle and add it to the hub's store (rollouts can then use it)."""
    config = load_config(config_path, overrides={"db": db})
    from cloud_hub.bundles import load_public_key

    keys = [load_public_key(p) for p in trusted_keys]
    store = _open_store(config)
    try:
        added = store.add_bundle(path, trusted_keys=keys)
        where = store.describe()
    finally:
        store.close()
    click.echo(f"added bundle {added.name} {added.version} (sha256 {added.sha256[:12]}..., "
               f"signer {added.signer_key_id}) to {where}")
