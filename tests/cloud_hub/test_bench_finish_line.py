"""The hub benchmark's finish line: stamped by the workers' on_batch observer, not polled."""

from __future__ import annotations

import time

import pytest

from cloud_hub.ingest import IngestResult
from edgefleet.bench_hub import _FinishLine


def test_the_finish_line_is_stamped_in_the_batch_that_stores_the_last_message() -> None:
    """The time is taken in the observer call whose batch brings the stored count to n (as the
    bare subscriber stamps its last message), once; waiting before that times out."""
    finish = _FinishLine(5, "5 messages stored")
    finish(IngestResult(stored=2))
    finish(IngestResult(stored=2, duplicates=3))  # duplicates are not stored messages
    with pytest.raises(RuntimeError, match="4 stored"):
        finish.wait(0.0)
    before = time.perf_counter()
    finish(IngestResult(stored=1))
    after = time.perf_counter()
    finish(IngestResult(stored=4))  # a later batch does not move the line
    assert before <= finish.wait(0.0) <= after
