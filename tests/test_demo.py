"""The README's main job, the demo, runs and tells its story."""

from __future__ import annotations

from pathlib import Path

from edgefleet.demo import run_demo


def test_demo_flags_the_bright_site_only(tmp_path: Path) -> None:
    """The demo compiles and verifies its bundle; the brighter site drifts, the other does not."""
    result = run_demo(tmp_path, echo=False)
    assert result.bundle.exists()
    quiet, bright = result.drifted["site-a"], result.drifted["site-b"]
    assert len(bright) > result.features // 2
    assert "label" in bright or "confidence" in bright
    assert len(quiet) <= 3  # per-feature false alarms stay near the 1% design rate
