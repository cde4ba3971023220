"""`edgefleet fleet ...`: the fleet as the hub sees it — drift across devices, the registry, tags.

    edgefleet fleet drift --model digits --version 1.0.0 --since -24h --select site=a
    edgefleet fleet devices --select cohort=bright
    edgefleet fleet tag pi-17 site=north cohort=      (an empty value removes the tag)

``--db`` takes ``postgresql://...``, ``sqlite:///path`` or a file path (default
``$EDGEFLEET_HUB_DB``, else ``~/.local/share/edgefleet/hub.db``). Library errors
(:class:`cloud_hub.errors.CloudHubError`) become one ``error:`` line and exit code 1 in
``edgefleet.cli``.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import click

from cloud_hub.errors import QueryError
from cloud_hub.fleet_drift import fleet_drift, format_fleet_drift, format_time
from cloud_hub.store import DeviceRecord, open_store
from cloud_hub.tags import parse_tags

__all__ = ["devices_table", "fleet", "parse_time"]

DB_OPTION = click.option(
    "--db", envvar="EDGEFLEET_HUB_DB", default=None, metavar="URL|PATH",
    help="Hub database: postgresql://..., sqlite:///path or a file path "
         "[default: $EDGEFLEET_HUB_DB, else ~/.local/share/edgefleet/hub.db]")
SELECT_OPTION = click.option("--select", "selector", default=None, metavar="K=V[,K=V]",
                             help="Only devices whose tags match all of these.")

_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float) -> float:
    """``now``, ``-24h`` / ``-30m`` / ``-7d`` / ``-90s``, epoch seconds, or ISO 8601 (a time
    without a zone is UTC) -> seconds since the epoch; QueryError naming the text."""
    t = text.strip()
    if t == "now":
        return now
    m = _RELATIVE.fullmatch(t)
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(t)
    except ValueError:
        raise QueryError(f"time {text!r} is not 'now', a relative time like -24h / -30m / -7d, "
                         "epoch seconds, or ISO 8601 like 2026-01-31T12:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def devices_table(records: list[DeviceRecord]) -> str:
    """The registry as a table, one device a line."""
    lines = [f"{'device':<24} {'online':<7} {'last seen':<18} {'versions':<28} {'phase':<11} "
             f"{'up_to_seq':>9}  tags"]
    for d in records:
        versions = ", ".join(f"{slot}: {v}" for slot, v in d.versions().items()) or "-"
        tags = ",".join(f"{k}={v}" for k, v in sorted(d.tags.items())) or "-"
        lines.append(f"{d.device_id[:24]:<24} {'yes' if d.online else 'no':<7} "
                     f"{format_time(d.last_seen):<18} {versions[:28]:<28} "
                     f"{d.swap_phase or '-':<11} {d.up_to_seq:>9}  {tags}")
    lines.append(f"{len(records)} device(s)")
    return "\n".join(lines)


@click.group()
def fleet() -> None:
    """The fleet seen from the hub: drift across devices, the registry, operator tags."""


@fleet.command("drift")
@DB_OPTION
@click.option("--model", "model_name", required=True, help="Bundle name.")
@click.option("--version", "model_version", required=True, help="Bundle version.")
@click.option("--since", default="-24h", show_default=True,
              help="Start: -24h / -30m / -7d, ISO 8601 (UTC unless it says), or epoch seconds.")
@click.option("--until", default="now", show_default=True, help="End, same forms.")
@SELECT_OPTION
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=1),
              help="Devices and tag values to list.")
def drift_command(db: str | None, model_name: str, model_version: str, since: str, until: str,
                  selector: str | None, top: int) -> None:
    """Merge a model version's drift sketches across the fleet and judge every feature.

    Works in whole hours: SINCE is rounded down and UNTIL up to the hour.
    """
    now = time.time()
    start, end = parse_time(since, now), parse_time(until, now)
    with open_store(db) as store:
        result = fleet_drift(store, model_name=model_name, model_version=model_version,
                             since=start, until=end, selector=selector, top=top)
    click.echo(format_fleet_drift(result))


@fleet.command("devices")
@DB_OPTION
@SELECT_OPTION
def devices_command(db: str | None, selector: str | None) -> None:
    """The device registry: online state, last seen, versions, tags, receipted seq."""
    with open_store(db) as store:
        click.echo(devices_table(store.devices(selector)))


@fleet.command("tag")
@DB_OPTION
@click.argument("device_id")
@click.argument("tags", nargs=-1, required=True)
def tag_command(db: str | None, device_id: str, tags: tuple[str, ...]) -> None:
    """Set operator tags of DEVICE_ID: k=v (k= removes k). Operator tags override the tags a
    device reports for itself."""
    changes = parse_tags(tags)
    with open_store(db) as store:
        record = store.set_tags(device_id, changes)
    shown = ",".join(f"{k}={v}" for k, v in sorted(record.tags.items())) or "(none)"
    click.echo(f"{device_id}: tags {shown}")
