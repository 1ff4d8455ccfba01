"""Typed configuration: dataclasses filled from YAML files and `key=value` overrides.

Precedence everywhere: dataclass defaults < YAML file < command-line flags < `key=value` overrides.
Unknown keys and values of the wrong type are errors (nanoGPT's configurator, but checked).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from ldm_pipeline.errors import UserError

T = TypeVar("T")

# Configs ship inside the package (the repository's configs/ is a link to ldm_pipeline/configs) so that
# `--config tiny` works after a plain `pip install`.
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_dir() -> Path:
    """The folder holding models/, train/ and accelerate/ configs."""
    return PACKAGE_CONFIG_DIR


def resolve_config_path(spec: str | Path, kind: str) -> Path:
    """A config path as given, or a bare name (``tiny``) looked up in ``configs/<kind>/<name>.yaml``."""
    path = Path(spec)
    if path.is_file():
        return path
    candidate = config_dir() / kind / f"{spec}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in (config_dir() / kind).glob("*.yaml"))
    raise UserError(f"config '{spec}' not found: pass a YAML file path or one of {', '.join(known) or '(none)'}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a UserError."""
    import yaml

    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read config {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a YAML mapping of key: value")
    return data


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one value against a type hint (bool/int/float/str/Optional/list/tuple/dict/dataclass)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise UserError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)  # "1e4" is a common way to write step counts
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise UserError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key}: expected a string, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise UserError."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys ({"data": {"seed": 0}} -> {"data.seed": 0})."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain YAML/JSON-ready data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(obj)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings (dotted keys for nested fields) → nested dict; values parsed as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value (e.g. optimizer.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (update wins), returning a new dict."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type[T], path: str | Path | None = None, *layers: dict[str, Any]) -> T:
    """Defaults < YAML at `path` < each mapping in `layers` (flags, then key=value overrides)."""
    data: dict[str, Any] = load_yaml(path) if path else {}
    for layer in layers:
        data = merge(data, {k: v for k, v in layer.items() if v is not None})
    return from_dict(cls, data)


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write a dataclass (or mapping) as YAML."""
    import yaml

    data = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
