"""`edgefleet fleet drift | devices | tag` on a real hub database, errors as one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloud_hub.cli_fleet import parse_time
from cloud_hub.errors import QueryError
from cloud_hub.fleet_drift import HOUR
from cloud_hub.store import HubStore
from edgefleet.cli import main
from tests.cloud_hub.test_fleet_drift import T0, _drifting_fleet


@pytest.fixture
def hub_db(tmp_path: Path, small_bundle: Any) -> str:
    db = tmp_path / "hub.db"
    with HubStore(path=db) as store:
        store.add_bundle(small_bundle.manifest)
        _drifting_fleet(store, small_bundle.manifest, hours=2)
    return str(db)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_drift_table_shows_where_drift_comes_from(hub_db: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "fleet", "drift", "--db", hub_db, "--model", "small",
                         "--version", "1.2.0", "--since", "2023-11-14T22:00",
                         "--until", str(T0 + 2 * HOUR), "--top", "2")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("small 1.2.0: 6 of 6 device(s) reporting, 144 window(s), "
                               "28800 rows, 2023-11-14 22:00Z -> 2023-11-15 00:00Z")
    assert lines[2].split() == ["feature", "rows", "missing", "outside", "psi", "limit", "js",
                                "limit", "verdict"]
    assert any(line.startswith("missing: rows without a value; outside: ") for line in lines)
    where = lines.index(next(line for line in lines if line.startswith("device ")))
    assert lines[where + 1].split()[0] == "pi-4" and lines[where + 1].endswith("DRIFT")
    assert lines[where + 2].endswith(" ok") and lines[where + 3] == ""
    tags = lines[where + 4:]
    assert tags[0].startswith("tag ") and tags[1].startswith("site=c ")


def test_drift_with_a_selector_and_relative_times(hub_db: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Defaults cover the last 24 h: this fleet's 2023 windows are not in them."""
    code, out, _ = run(capsys, "fleet", "drift", "--db", hub_db, "--model", "small",
                       "--version", "1.2.0", "--select", "site=a")
    assert code == 0 and "0 of 2 device(s) reporting, 0 window(s)" in out
    assert "devices site=a" in out and "not enough data" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--version", "9.9.9"], "error: bundle small 9.9.9 was never added to this hub"),
    (["--version", "1.2.0", "--select", "site"], "error: selector part 'site' is not key=value"),
    (["--version", "1.2.0", "--since", "yesterday"], "error: time 'yesterday' is not"),
])
def test_drift_errors_are_one_line(hub_db: str, capsys: pytest.CaptureFixture[str],
                                   args: list[str], message: str) -> None:
    code, out, err = run(capsys, "fleet", "drift", "--db", hub_db, "--model", "small", *args)
    assert code == 1 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_devices_and_tags(hub_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "fleet", "tag", "--db", hub_db, "pi-0", "cohort=bright",
                       "line=2")
    assert (code, out) == (0, "pi-0: tags cohort=bright,line=2,site=a\n")
    # an empty value removes the operator tag: the device's own line=1 shows again
    code, out, _ = run(capsys, "fleet", "tag", "--db", hub_db, "pi-0", "line=")
    assert (code, out) == (0, "pi-0: tags cohort=bright,line=1,site=a\n")
    code, out, _ = run(capsys, "fleet", "devices", "--db", hub_db, "--select", "cohort=bright")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["device", "online", "last"]
    assert lines[1].split()[:2] == ["pi-0", "yes"] and "blue: toy 1.0.0" in lines[1]
    assert lines[1].endswith("cohort=bright,line=1,site=a") and lines[-1] == "1 device(s)"
    code, _, err = run(capsys, "fleet", "tag", "--db", hub_db, "ghost", "site=a")
    assert code == 1 and err.startswith("error: no device 'ghost' on this hub")


def test_parse_time() -> None:
    now = 1_000_000.0
    assert parse_time("now", now) == now
    assert parse_time("-24h", now) == now - 86400 and parse_time("-30m", now) == now - 1800
    assert parse_time("-7d", now) == now - 7 * 86400 and parse_time("12.5", now) == 12.5
    assert parse_time("1970-01-02T00:00", now) == 86400.0
    assert parse_time("1970-01-02T01:00+01:00", now) == 86400.0
    with pytest.raises(QueryError, match="'-3w'"):
        parse_time("-3w", now)
