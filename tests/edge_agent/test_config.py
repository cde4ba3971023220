"""Agent configuration: TOML plus environment, with errors that name the key and value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import load_config
from edge_agent.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_file_and_defaults(tmp_path: Path) -> None:
    """A minimal file gets loopback HTTP, 5-minute windows and input sampling off."""
    cfg = load_config(_write(tmp_path, 'data_dir = "/var/lib/x"\ntrusted_keys = ["/k.pub"]\n'),
                      environ={})
    assert cfg.http.host == "127.0.0.1" and cfg.telemetry.window_seconds == 300
    assert cfg.privacy.sample_inputs is False
    assert cfg.db_path == Path("/var/lib/x/agent.db")


def test_environment_overrides(tmp_path: Path) -> None:
    """EDGEFLEET_AGENT_* variables override the file, sections with a double underscore."""
    path = _write(tmp_path, 'data_dir = "/d"\ntrusted_keys = ["/k.pub"]\n[http]\nport = 1\n')
    cfg = load_config(path, environ={"EDGEFLEET_AGENT_HTTP__PORT": "9000",
                                     "EDGEFLEET_AGENT_DEVICE_ID": "press-07",
                                     "EDGEFLEET_AGENT_TRUSTED_KEYS": '["/a.pub", "/b.pub"]'})
    assert cfg.http.port == 9000 and cfg.device_id == "press-07"
    assert cfg.trusted_keys == (Path("/a.pub"), Path("/b.pub"))


@pytest.mark.parametrize(("text", "env", "expected"), [
    ('data_dir = "/d"\ntrusted_keys = ["/k"]\nbogus = 1\n', {}, "config key bogus"),
    ('data_dir = "/d"\ntrusted_keys = ["/k"]\n[http]\nport = 70000\n', {},
     "config key http.port = 70000"),
    ('trusted_keys = ["/k"]\n', {}, "config key data_dir: Field required"),
    ('data_dir = "/d"\ntrusted_keys = []\n', {}, "config key trusted_keys"),
    ('data_dir = "/d"\ntrusted_keys = ["/k"]\n', {"EDGEFLEET_AGENT_TELEMETRY__WINDOW_SECONDS": "x"},
     "config key telemetry.window_seconds = 'x'"),
    ('data_dir = "/d"\ntrusted_keys = ["/k"]\ndevice_id = "a b"\n', {}, "config key device_id"),
    ("data_dir = \n", {}, "not valid TOML"),
])
def test_bad_config_names_key_and_value(tmp_path: Path, text: str, env: dict[str, str],
                                        expected: str) -> None:
    """Each bad key or value is refused with the key, the value and what was expected."""
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ=env)
    assert expected in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    """A config path that does not exist is named in the error."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_the_config_path_variable_is_not_a_key(tmp_path: Path, keypair: Any) -> None:
    """EDGEFLEET_AGENT_CONFIG names the file (the CLI's envvar); it is not read as a key."""
    from edge_agent.config import load_config

    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\ntrusted_keys = ["{keypair.public_path}"]\n')
    config = load_config(cfg, environ={"EDGEFLEET_AGENT_CONFIG": str(cfg),
                                       "EDGEFLEET_AGENT_SYNC__PASSWORD": "1234"})
    assert config.data_dir == tmp_path
