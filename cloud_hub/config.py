"""Hub configuration: a TOML file, overridden by environment variables, overridden by CLI flags.

Environment variables are ``EDGEFLEET_HUB_<KEY>`` for top-level keys and
``EDGEFLEET_HUB_<SECTION>__<KEY>`` for keys in a section, e.g.
``EDGEFLEET_HUB_BROKER__URL=mqtt://broker:1883``. Values are parsed as TOML values when they
parse (numbers, booleans) and taken as strings otherwise. Every error names the key, the bad
value and what was expected.

With nothing configured, ``edgefleet hub serve`` stores into the default SQLite file
(``$EDGEFLEET_HUB_DB``, else ``~/.local/share/edgefleet/hub.db``: the file every ``edgefleet
hub``/``fleet`` command opens without ``--db``) and starts the embedded broker on
127.0.0.1:1883 (quick start). Example for production, beside devices/mosquitto/mosquitto.conf::

    db = "postgresql://edgefleet@db.example/edgefleet"   # or a SQLite file path

    [broker]
    url = "mqtts://broker.example:8883"
    username = "hub"
    password_file = "/etc/edgefleet-hub/mqtt-password"
    ca_certs = "/etc/edgefleet-hub/ca.crt"
    group = "hub"                 # workers of one group split the fleet ($share/hub/...)
    client_id = "hub-a"           # stable and unique per hub process (the broker's session)

    [ingest]
    workers = 1
    batch_max = 500
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from cloud_hub.errors import CloudHubError
from fleet_protocol.config_files import load_toml_model

__all__ = ["BrokerConfig", "EmbeddedBrokerConfig", "HubConfig", "HubConfigError", "IngestConfig",
           "load_config"]

ENV_PREFIX = "EDGEFLEET_HUB_"


class HubConfigError(CloudHubError):
    """A hub config file, environment variable or flag with a bad key or value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Section):
    """How the hub reaches the broker (names as in the agent's ``[sync]`` section)."""

    #: mqtt://host[:1883] or mqtts://host[:8883] (TLS); unset: start the embedded broker
    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    #: a file holding the password (first line); the alternative to ``password``
    password_file: Path | None = None
    #: TLS: CA bundle to trust (default: the system's), client certificate and key
    ca_certs: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    #: "auto": MQTT 5, or 3.1.1 for a broker that refuses 5 (then without $share)
    mqtt_version: Literal["auto", 5, 311] = "auto"
    #: the shared-subscription group: workers of one group split the fleet
    group: str = Field(default="hub", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    #: stable and unique per hub process; default edgefleet-hub-<group>-<hostname>
    client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,100}$")
    #: unset: shared when the connection is MQTT 5
    shared: bool | None = None
    #: how long the broker keeps the session (and queues messages) while the hub is down;
    #: also how long a crashed worker's share of a shared subscription waits for it
    session_expiry_seconds: int = Field(default=3600, ge=0, le=2**32 - 1)
    keepalive_seconds: int = Field(default=30, ge=5, le=3600)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from cloud_hub.worker import parse_broker_url

        parse_broker_url(v)  # ValueError names the URL and what is expected
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BrokerConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set broker.password or broker.password_file, not both")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("broker.certfile and broker.keyfile go together (client "
                             "certificate)")
        if (self.ca_certs or self.certfile) and not (self.url or "").startswith("mqtts:"):
            raise ValueError(f"TLS files are set but broker.url {self.url!r} is not mqtts://")
        return self

    def password_text(self) -> str | None:
        """The password, read from ``password_file`` when that is set."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        try:
            lines = self.password_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise HubConfigError(f"config key broker.password_file = '{self.password_file}': "
                                 f"cannot read it ({err})") from err
        return lines[0] if lines else ""


class EmbeddedBrokerConfig(_Section):
    """The quick-start broker, started only when ``broker.url`` is unset."""

    #: loopback only: the embedded broker has no authentication or ACL
    host: Literal["127.0.0.1", "localhost"] = "127.0.0.1"
    #: 0: a free port
    port: int = Field(default=1883, ge=0, le=65535)


class IngestConfig(_Section):
    #: workers in this process (each its own MQTT session <client_id>-<i> and store connection)
    workers: int = Field(default=1, ge=1, le=64)
    batch_max: int = Field(default=500, ge=1, le=100_000)
    batch_wait_seconds: float = Field(default=0.05, ge=0.0, le=60.0)
    #: unacknowledged messages the broker may send (MQTT 5 Receive Maximum)
    inflight: int = Field(default=1000, ge=1, le=65_535)
    #: how often the hub folds newly stored windows into the drift rollups, so a fleet drift
    #: query finds little left to do (0: only when a query runs)
    rollup_refresh_seconds: float = Field(default=30.0, ge=0.0, le=86_400.0)


class HubConfig(_Section):
    #: postgresql://user@host/db, sqlite:///path or a SQLite file path; unset: the default file
    db: str | None = Field(default=None, min_length=1)
    broker: BrokerConfig = BrokerConfig()
    embedded_broker: EmbeddedBrokerConfig = EmbeddedBrokerConfig()
    ingest: IngestConfig = IngestConfig()

    @field_validator("db")
    @classmethod
    def _db(cls, v: str | None) -> str | None:
        if v is not None and "://" in v and not re.match(r"^(sqlite|postgres(ql)?)(\+\w+)?://",
                                                         v):
            raise ValueError("expected postgresql://user@host/dbname, sqlite:///path/to/hub.db "
                             "or a file path")
        return v


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> HubConfig:
    """Read the TOML file (if any), apply environment variables, then ``overrides``, validate.

    ``overrides`` maps dotted keys (``"broker.url"``) to values; None values are skipped (a CLI
    flag that was not given).
    """
    return load_toml_model(HubConfig, path, prefix=ENV_PREFIX, error=HubConfigError,
                           environ=environ, overrides=overrides,
                           text_keys=frozenset({"username", "password", "client_id", "group"}))
