"""TOML config files with environment overrides, read the same way by the agent and the hub.

A config is a TOML file (optional), then environment variables ``<PREFIX><KEY>`` for top-level
keys and ``<PREFIX><SECTION>__<KEY>`` for keys in a section, then explicit overrides (dotted
keys, e.g. CLI flags), validated by a pydantic model. Environment values are parsed as TOML
values when they parse (numbers, booleans, arrays) and taken as text otherwise; ``text_keys``
(names, secrets) always stay text, so a password "1234" is not an integer. ``<PREFIX>CONFIG``
names the file itself and is not a key. Every error names the key, the bad value (never a
secret's) and what was expected, raised as the caller's own error class.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["load_toml_model"]

M = TypeVar("M", bound=BaseModel)


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set(data: dict[str, Any], name: str, path: list[str], value: Any,
         error: type[Exception]) -> None:
    target = data
    for part in path[:-1]:
        section = target.setdefault(part, {})
        if not isinstance(section, dict):
            raise error(f"{name}: {part!r} is not a section")
        target = section
    target[path[-1]] = value


def load_toml_model(model: type[M], path: str | Path | None, *, prefix: str,
                    error: type[Exception], environ: Mapping[str, str] | None = None,
                    text_keys: frozenset[str] = frozenset(),
                    overrides: Mapping[str, Any] | None = None) -> M:
    """Read ``path`` (if any), apply ``environ`` (default ``os.environ``) and ``overrides``
    (None values skipped: a flag that was not given), validate as ``model``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise error(f"config file {p} does not exist") from err
        except (OSError, UnicodeDecodeError) as err:
            raise error(f"cannot read config file {p}: {err}") from err
        except tomllib.TOMLDecodeError as err:
            raise error(f"config file {p} is not valid TOML: {err}") from err
    for name, raw in (os.environ if environ is None else environ).items():
        if not name.startswith(prefix) or name == prefix + "CONFIG":
            continue
        keys = name[len(prefix):].lower().split("__")
        _set(data, name, keys, raw if keys[-1] in text_keys else _env_value(raw), error)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(data, key, key.split("."), value, error)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(root)"
        value = first.get("input")
        secret = any("password" in str(part) for part in first["loc"])
        # a section's own checks name their keys in the message; its dict may hold a password
        shown = ("" if first["type"] == "missing" or secret or isinstance(value, dict)
                 else f" = {value!r:.80}")
        message = first["msg"].removeprefix("Value error, ")
        raise error(
            f"config key {key}{shown}: {message}"
            + (f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else "")
        ) from err
