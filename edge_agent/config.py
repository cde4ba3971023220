"""Agent configuration: a TOML file, overridden by environment variables.

Environment variables are ``EDGEFLEET_AGENT_<KEY>`` for top-level keys and
``EDGEFLEET_AGENT_<SECTION>__<KEY>`` for keys in a section, e.g.
``EDGEFLEET_AGENT_HTTP__PORT=9000``. Values from the environment are parsed as TOML values when
they parse (numbers, booleans, arrays) and taken as strings otherwise; ``device_id``,
``username``, ``password`` and ``client_id`` are always strings (a password "1234" stays
text). Every error names the key, the bad value and what was expected.

Example (devices/raspberry-pi/agent.toml is the template)::

    device_id = "press-07"
    data_dir = "/var/lib/edgefleet"
    trusted_keys = ["/etc/edgefleet/fleet.pub"]
    bundle = "/etc/edgefleet/bundles/vibration-1.0.0.edgebundle"

    [http]
    port = 8080

    [sync]                                  # store-and-forward to the hub over MQTT
    broker_url = "mqtts://hub.example.com:8883"
    username = "press-07"
    password_file = "/etc/edgefleet/mqtt.password"
    ca_certs = "/etc/edgefleet/ca.pem"

``tags = {site = "a"}`` at the top level labels the device for fleet selectors (sent in its
retained state message).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from edge_agent.errors import ConfigError
from fleet_protocol import topics
from fleet_protocol.config_files import load_toml_model
from fleet_protocol.messages import MAX_ITEMS, Tags, TelemetryEnvelope

__all__ = ["AgentConfig", "HttpConfig", "SyncConfig", "load_config"]

ENV_PREFIX = "EDGEFLEET_AGENT_"
_TEXT_KEYS = frozenset({"device_id", "username", "password", "client_id"})


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
    #: predictions kept for joining feedback (ids, outputs, times; never inputs): how late
    #: ground truth may come. Measured: ~5 bytes each in 1024-row batches, ~17 at 10 single
    #: requests a second, ~100 at one a second (a row per flush): 1,000,000 is 28 h at 10/s
    #: (17 MB), 11.6 days at 1/s (100 MB)
    keep_predictions: int = Field(default=1_000_000, ge=100)
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


MIB = 1024 * 1024


class SyncConfig(_Section):
    """Store-and-forward to the hub over MQTT (DESIGN, "Delivery and durability").

    Off unless ``broker_url`` is set (or ``enabled = true``, which then needs one). While off,
    nothing is written to the outbox.
    """

    enabled: bool = False
    #: mqtt://host[:1883] or mqtts://host[:8883] (TLS)
    broker_url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    #: a file holding the password (first line); the alternative to ``password``
    password_file: Path | None = None
    #: TLS: CA bundle to trust (default: the system's), client certificate and key
    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    #: MQTT client id; defaults to the device id (broker ACLs may match it with %c)
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    #: unset: MQTT 5 (persistent session with an expiry), falling back to 3.1.1 when the
    #: broker refuses or ignores a version-5 CONNECT; 5 or 311 pins one
    mqtt_version: Literal[5, 311] | None = None
    keepalive_seconds: int = Field(default=60, ge=5, le=65535)
    #: how long the broker keeps the session (subscriptions, queued receipts) while offline
    session_expiry_seconds: int = Field(default=7 * 86400, ge=0, le=2**32 - 1)
    #: disk the outbox may use; past it the oldest samples, then events, then windows go
    quota_bytes: int = Field(default=64 * MIB, ge=64 * 1024)
    #: per telemetry message: items, and bytes of item JSON (kept far under the wire limit)
    max_batch_items: int = Field(default=100, ge=1, le=MAX_ITEMS - 1)
    max_batch_bytes: int = Field(default=256 * 1024, ge=4096,
                                 le=TelemetryEnvelope.MAX_WIRE_BYTES // 2)
    #: messages sent and not yet receipted by the hub
    max_inflight: int = Field(default=4, ge=1, le=100)
    #: an unreceipted message is sent again after this long (and after every reconnect)
    resend_after_seconds: float = Field(default=30.0, ge=0.1, le=86_400.0)
    #: reconnect delays: random(0, min(cap, base * 2**attempt)) ("full jitter")
    backoff_base_seconds: float = Field(default=1.0, gt=0.0, le=3600.0)
    backoff_cap_seconds: float = Field(default=120.0, gt=0.0, le=86_400.0)
    #: how often the publisher looks for new outbox rows when the writer did not wake it
    poll_seconds: float = Field(default=1.0, gt=0.0, le=60.0)

    @model_validator(mode="before")
    @classmethod
    def _enabled_by_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and "enabled" not in data:
            data = {**data, "enabled": bool(data.get("broker_url"))}
        return data

    @field_validator("broker_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError("expected mqtt://host:port or mqtts://host:port (TLS)")
        try:
            parts.port  # noqa: B018 -- raises on a port that is not a number in range
        except ValueError as err:
            raise ValueError(f"bad port: {err}") from None
        if not parts.hostname:
            raise ValueError("no host; expected mqtt://host:port or mqtts://host:port")
        if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
            raise ValueError("expected only scheme, host and port (put the user in "
                             "sync.username and the password in sync.password_file)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SyncConfig:
        if self.enabled and not self.broker_url:
            raise ValueError("sync.enabled is true but sync.broker_url is not set")
        if self.password is not None and self.password_file is not None:
            raise ValueError("set sync.password or sync.password_file, not both")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("sync.certfile and sync.keyfile go together (client certificate)")
        tls_given = self.ca_certs or self.certfile
        if tls_given and self.broker_url and not self.tls:
            raise ValueError(f"TLS files are set but sync.broker_url {self.broker_url!r} is "
                             "not mqtts://")
        if self.backoff_cap_seconds < self.backoff_base_seconds:
            raise ValueError(f"sync.backoff_cap_seconds {self.backoff_cap_seconds} is below "
                             f"sync.backoff_base_seconds {self.backoff_base_seconds}")
        # the batches in flight are never dropped by the quota: it must leave room beside them
        floor = 2 * self.max_inflight * self.max_batch_bytes
        if self.quota_bytes < floor:
            raise ValueError(
                f"sync.quota_bytes = {self.quota_bytes} is below 2 x sync.max_inflight "
                f"({self.max_inflight}) x sync.max_batch_bytes ({self.max_batch_bytes}) = "
                f"{floor}: raise sync.quota_bytes or lower the other two")
        return self

    @property
    def tls(self) -> bool:
        return self.broker_url is not None and self.broker_url.startswith("mqtts:")

    @property
    def host(self) -> str:
        assert self.broker_url is not None
        return urlsplit(self.broker_url).hostname or ""

    @property
    def port(self) -> int:
        assert self.broker_url is not None
        return urlsplit(self.broker_url).port or (8883 if self.tls else 1883)

    def password_text(self) -> str | None:
        """The password, read from ``password_file`` when that is set (ConfigError if not
        readable)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        try:
            text = self.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config key sync.password_file = '{self.password_file}': cannot "
                              f"read it ({err})") from err
        lines = text.splitlines()
        return lines[0] if lines else ""


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
    sync: SyncConfig = SyncConfig()
    #: the device's labels for fleet selectors, e.g. {site = "a"} (sent in its state message)
    tags: Tags = Field(default_factory=dict)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        # one MQTT topic level and a safe folder name on the hub (fleet_protocol.topics)
        if not all(c.isascii() and (c.isalnum() or c in "-_.") for c in v) or v in (".", ".."):
            raise ValueError("may hold only ASCII letters, digits, '-', '_' and '.' (not '.' "
                             "or '..')")
        topics.check_device_id(v)
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


def load_config(path: str | Path | None = None,
                environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read the TOML file (if any), apply environment overrides, validate."""
    return load_toml_model(AgentConfig, path, prefix=ENV_PREFIX, error=ConfigError,
                           environ=environ, text_keys=_TEXT_KEYS)
