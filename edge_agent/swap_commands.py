"""Swap commands as they arrive from outside (local HTTP, later MQTT): validated into events.

A strict pydantic model at the trust boundary: unknown fields, a missing id or a source on the
wrong command are refused naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.errors import InputError
from edge_agent.swap_events import Command, Commit, Promote, Rollback, Shadow, Stage

__all__ = ["SwapCommandBody", "parse_command"]


class SwapCommandBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Literal["stage", "shadow", "promote", "commit", "rollback"]
    id: str = Field(min_length=1, max_length=128)
    source: str | None = Field(default=None, min_length=1, max_length=4096)
    version: str | None = None
    force: bool = False
    reason: str = Field(default="operator", max_length=1000)

    def to_event(self) -> Command:
        if self.command == "stage":
            if self.source is None:
                raise InputError("stage needs 'source': a bundle file path or http(s) URL")
            return Stage(id=self.id, source=self.source, version=self.version, force=self.force)
        if self.source is not None or self.version is not None:
            raise InputError(f"{self.command} takes no 'source' or 'version'")
        if self.command == "shadow":
            return Shadow(id=self.id)
        if self.command == "promote":
            return Promote(id=self.id)
        if self.command == "commit":
            return Commit(id=self.id)
        return Rollback(id=self.id, reason=self.reason)


def parse_command(doc: Any) -> Command:
    """A JSON object -> a swap command event, or InputError naming the bad field."""
    try:
        body = SwapCommandBody.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(body)"
        raise InputError(f"swap command field {loc}: {first['msg']}") from err
    return body.to_event()
