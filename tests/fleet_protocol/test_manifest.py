"""Bundle manifest helpers."""

from __future__ import annotations


def test_semver_precedence() -> None:
    """Versions sort by SemVer precedence: pre-releases before the release, numbers as numbers."""
    from fleet_protocol.manifest import semver_key

    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta",
               "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0",
               "2.0.0"]
    assert sorted(reversed(ordered), key=semver_key) == ordered
    assert semver_key("1.0.0+build.5") == semver_key("1.0.0")
