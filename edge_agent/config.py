"""Agent configuration: a TOML file, overridden by environment variables.

Environment variables are ``EDGEFLEET_AGENT_<KEY>`` for top-level keys and
``EDGEFLEET_AGENT_<SECTION>__<KEY>`` for keys in a section, e.g.
``EDGEFLEET_AGENT_HTTP__PORT=9000``. Values from the environment are parsed as TOML values when
they parse (numbers, booleans, arrays) and taken as strings otherwise. Every error names the key,
the bad value and what was expected.

Example (devices/raspberry-pi/agent.toml is the template)::

    device_id = "press-07"
    data_dir = "/var/lib/edgefleet"
    trusted_keys = ["/etc/edgefleet/fleet.pub"]
    bundle = "/etc/edgefleet/bundles/vibration-1.0.0.edgebundle"

    [http]
    port = 8080
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.errors import ConfigError

__all__ = ["AgentConfig", "HttpConfig", "load_config"]

ENV_PREFIX = "EDGEFLEET_AGENT_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuntimeConfig(_Section):
    #: onnxruntime threads per session; 1 keeps latency flat on a 4-core Pi serving one model
    intra_op_threads: int = Field(default=1, ge=1, le=64)
    inter_op_threads: int = Field(default=1, ge=1, le=64)


class HttpConfig(_Section):
    enabled: bool = True
    #: loopback by default: the local API is for processes on the device
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: request bodies larger than this are refused before parsing (413)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)


class TelemetryConfig(_Section):
    #: tumbling window length for sketches and metrics
    window_seconds: float = Field(default=300.0, ge=1.0, le=86_400.0)
    #: how often the writer commits; a power cut loses at most this much of the open window
    flush_interval_seconds: float = Field(default=1.0, gt=0.0, le=60.0)
    #: predictions kept for joining feedback (ids, outputs, times; never inputs)
    keep_predictions: int = Field(default=100_000, ge=100)
    #: closed windows kept locally after they are written
    keep_windows: int = Field(default=2016, ge=1)


class PrivacyConfig(_Section):
    #: store raw inputs of a sample of requests; off by default — raw inputs stay unrecorded
    sample_inputs: bool = False
    sample_rate: float = Field(default=0.01, ge=0.0, le=1.0)


class SwapConfig(_Section):
    """Local health gates after a promotion, and the shadow / canary split."""

    max_error_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    max_nonfinite: int = Field(default=0, ge=0)
    #: green's p99 latency may be at most this many times blue's
    max_p99_ratio: float = Field(default=2.0, ge=1.0)
    min_requests_for_gates: int = Field(default=50, ge=1)
    #: starts after a promotion, without a commit, before the agent boots blue again
    max_starts_before_rollback: int = Field(default=3, ge=1)
    max_rollbacks: int = Field(default=3, ge=1)
    rollback_window_seconds: float = Field(default=3600.0, gt=0)
    #: during shadow, the fraction of requests green answers (sticky by request key)
    canary_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    #: shadow runs waiting for green; past this they are dropped and counted
    shadow_queue: int = Field(default=1000, ge=1)

    def policy(self) -> Any:
        from edge_agent.swap_events import SwapPolicy

        return SwapPolicy(
            max_error_rate=self.max_error_rate, max_nonfinite=self.max_nonfinite,
            max_p99_ratio=self.max_p99_ratio, min_requests_for_gates=self.min_requests_for_gates,
            max_starts_before_rollback=self.max_starts_before_rollback,
            max_rollbacks=self.max_rollbacks, rollback_window_seconds=self.rollback_window_seconds)


class AgentConfig(_Section):
    device_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    data_dir: Path
    trusted_keys: tuple[Path, ...] = Field(min_length=1)
    #: a bundle to install at start when it differs from the one serving
    bundle: Path | None = None
    runtime: RuntimeConfig = RuntimeConfig()
    http: HttpConfig = HttpConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    swap: SwapConfig = SwapConfig()

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        if not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("may hold only letters, digits, '-', '_' and '.'")
        return v

    @property
    def db_path(self) -> Path:
        return self.data_dir / "agent.db"

    @property
    def bundles_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def numba_cache_dir(self) -> Path:
        return self.data_dir / "numba-cache"


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        target = data
        for part in path[:-1]:
            section = target.setdefault(part, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{name}: {part!r} is not a section")
            target = section
        target[path[-1]] = _env_value(raw)


def load_config(path: str | Path | None = None,
                environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read the TOML file (if any), apply environment overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError(f"config file {p} does not exist") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {p}: {err}") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {p} is not valid TOML: {err}") from err
    _apply_env(data, os.environ if environ is None else environ)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(root)"
        value = first.get("input")
        shown = "" if first["type"] == "missing" else f" = {value!r:.80}"
        raise ConfigError(
            f"config key {key}{shown}: {first['msg']}"
            + (f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else "")
        ) from err
