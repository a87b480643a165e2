"""Typed configuration shared by every stage.

Every stage config subclasses :class:`Config`: unknown keys and wrong types are errors that
name the field (and the YAML file), so a typo never silently falls back to a default.
Defaults are the paper's values where it gives one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the file and field."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  field '{loc}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level, got {type(data).__name__}")
    return data


class Config(BaseModel):
    """Base of every typed config: strict keys, YAML in/out, flat view for trackers."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None, source: str = "<dict>") -> C:
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise ConfigError(_format_validation_error(e, source)) from None

    @classmethod
    def from_yaml(cls: type[C], path: str | os.PathLike) -> C:
        return cls.from_dict(load_yaml(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self, path: str | os.PathLike) -> None:
        from qbert.utils.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def flat(self, prefix: str = "") -> dict[str, Any]:
        """Dotted-key view (``fusion.layers``): MLflow params cannot take nested dicts."""
        return flatten_dict(self.to_dict(), prefix)

    def override(self: C, dotted: dict[str, Any]) -> C:
        """A copy with ``{"a.b": v}`` overrides applied and re-validated (used by sweeps and CLI)."""
        data = self.to_dict()
        for key, value in dotted.items():
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"override '{key}': '{part}' is not a config section")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"override '{key}': unknown field '{parts[-1]}'")
            node[parts[-1]] = value
        return type(self).from_dict(data, source="overrides")


def parse_overrides(items: "list[str] | tuple[str, ...]") -> dict[str, Any]:
    """``["a.b=3", "c=[x, y]"]`` (the CLI's repeatable ``--set``) -> ``{"a.b": 3, "c": ["x", "y"]}``.

    Values are parsed as YAML so numbers, booleans and lists keep their types.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
    return out


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out
