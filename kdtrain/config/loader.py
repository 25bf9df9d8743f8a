"""Strict YAML -> dataclass loading with command-line overrides.

Every user error is a ``ValueError`` whose message starts with the dotted path of the offending
field (``optimizer.lr: expected a number, got 'fast'``), so a typo in a 200-line config is found
at once instead of deep inside megatron-core.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(os.environ.get("KDTRAIN_CONFIG_DIR", REPO_ROOT / "configs"))


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (the plain loader keeps
    the last and silently drops the first, e.g. a second ``optimizer:`` section)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: the parent names it
                break
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): a config is a YAML file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def resolve_config_path(ref: str, kind: str) -> Path:
    """A config reference is a path to a YAML file or a name under ``configs/<kind>/``."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidate = CONFIG_DIR / kind / f"{ref}.yaml"
    if candidate.is_file():
        return candidate
    if not (CONFIG_DIR / kind).is_dir():
        where = f"KDTRAIN_CONFIG_DIR={CONFIG_DIR}" if "KDTRAIN_CONFIG_DIR" in os.environ else str(CONFIG_DIR)
        raise ValueError(f"unknown {kind} config {ref!r}: not a YAML file, and {where} has no {kind}/ folder of "
                         "named configs")
    known = sorted(q.stem for q in (CONFIG_DIR / kind).glob("*.yaml"))
    raise ValueError(f"unknown {kind} config {ref!r}: not a file and not one of {known}")


class OverrideText(str):
    """A command-line override's text that YAML reads as a number or a boolean: a string field
    takes the text as typed (``checkpoint.dir=0100`` is ``'0100'``, not octal 64;
    ``logging.dir=off`` is ``'off'``), any other field the YAML value (``parsed``)."""

    parsed: Any

    def __new__(cls, text: str, parsed: Any):
        obj = super().__new__(cls, text)
        obj.parsed = parsed
        return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ValueError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (bool, int, float)):
        value = OverrideText(raw.strip(), value)
    return key.split("."), value


def apply_overrides(raw: dict, overrides: Iterable[str], expand: dict[str, str] | None = None) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place; returned for convenience).

    ``expand`` maps a dotted key (``model``, ``teacher.model``) to a config kind: when an override
    reaches below such a key and its value is still a reference (``model: demo-student``), the
    referenced YAML is loaded first, so ``model.num_layers=4`` works on a named model.
    """
    expand = expand or {}
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            key = ".".join(path[: depth + 1])
            if isinstance(child, str) and key in expand:
                if expand[key] == "models" and (Path(child) / "config.json").is_file():
                    child = {"hf": child}  # a Hugging Face model directory (config/model.py)
                else:
                    ref_path = resolve_config_path(child, expand[key])
                    child = load_yaml(ref_path)
                    child.setdefault("name", ref_path.stem)
            if child is None:
                child = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ValueError(f"override {item!r}: {where} is not a section")
            node[part] = child
            node = child
        node[path[-1]] = value
    return raw


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _wants_text(tp: Any) -> bool:
    """A field an override's text goes to as typed: ``str``, a list of them (``data.path=2024``
    is the corpus ``2024``), or a union of those with no number or boolean (``Optional[str]``,
    ``str | list[str]``)."""
    origin = typing.get_origin(tp)
    if tp is str or (origin in (list, tuple) and typing.get_args(tp)[:1] == (str,)):
        return True
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        return any(_wants_text(a) for a in args) and not any(a in (bool, int, float) for a in args)
    return False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a type annotation."""
    if isinstance(value, OverrideText):
        value = str(value) if _wants_text(tp) else value.parsed
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where}: must be set")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str):
            low = value.lower()
            for c in choices:
                if isinstance(c, str) and c.lower() == low:
                    return c
        if value in choices:
            return value
        raise ValueError(f"{where}: {value!r} is not one of {list(choices)}")
    if origin in (list, tuple):
        if value is None:  # `key=` or `key:` with nothing after it
            raise ValueError(f"{where}: must be set (the value is empty)")
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):  # `1e6` and `4_096` are strings to PyYAML
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        try:
            f = float(value)
        except ValueError:
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        # PyYAML reads `3e-4` as a string (YAML 1.1), so numbers in strings are accepted.
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if value is None:  # `key=` or `key:` with nothing after it, not the text "None"
            raise ValueError(f"{where}: must be set (the value is empty)")
        if isinstance(value, (bool, int, float)):
            # YAML read the file's text as a number or boolean (`0100` is octal 64, `off` False):
            # what was meant is not known.
            raise ValueError(f"{where}: expected a string, got {value!r} (YAML reads the text as a "
                             f"{type(value).__name__}: quote it)")
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if isinstance(value, tp):
        return value
    raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def refuse_model_config(raw: dict, path, names: str) -> None:
    """A model config passed where a run config belongs (``--config configs/models/x.yaml``)."""
    if {"hidden_size", "num_layers"} & set(raw) and not {"model", "teacher", "student"} & set(raw):
        raise ValueError(f"{path}: a model config (hidden_size, num_layers, ...), not a run config: name it in a "
                         f"run config's {names}")


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ValueError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    odd = [k for k in data if not isinstance(k, str)]
    if odd:  # YAML 1.1 reads on/off/yes/no as booleans, digits as numbers
        raise ValueError(f"{prefix}{odd[0]!r}: a key must be a name, YAML read this one as a "
                         f"{type(odd[0]).__name__} (quote it, or check its spelling)")
    unknown = sorted(set(data) - names)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), sorted(names), n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        raise ValueError(
            f"{prefix}{unknown[0]}: unknown key ({hint}valid keys{' in ' + where if where else ''}: {sorted(names)})"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in data:
            if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where + '.' if where else ''}{f.name}: required key is missing")
            continue
        kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{where + '.' if where else ''}{f.name}")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check(where)
    return obj


def to_dict(obj) -> dict:
    """Dataclass -> plain dict (for logging and checkpoint metadata)."""
    return dataclasses.asdict(obj)


def field_error(where: str, name: str, message: str) -> ValueError:
    return ValueError(f"{where + '.' if where else ''}{name}: {message}")
