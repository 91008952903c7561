"""Typed dataclass configs: the single source of truth for every job.

YAML files and ``key=value`` overrides only *set* fields of these dataclasses. An unknown key, a
value of the wrong type, a value out of range or a malformed override is a ``ConfigError`` naming
the dotted key and where the value came from (the file that set it, or the command-line override).

Selecting the dataclass: a YAML file with ``kind: <name>`` builds the class registered for it with
``@register_config`` (pretraining kinds); a file without ``kind`` but with ``algo:`` is a training
job (``train_rl.py``) and builds the class registered as ``train``.

Composition: ``base: other.yaml`` (or a list of files), resolved relative to the file naming it,
loads those first and lets this file change a few keys (mappings merge key by key, except
``rewards``, which a file sets whole, and ``algo`` when the file names another algorithm; anything
else replaces). A field whose concrete dataclass depends on other values (``algo`` on ``algo.name``,
``rollout`` on the algorithm's model family) is resolved by the parent's ``__config_types__``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, which
    turns ``resume: no`` into False; here those stay strings."""


_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "tTfF":
    _Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list(_first))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and where it came from."""


class FieldError(ValueError):
    """Raised by a config's ``__post_init__`` for one field; the loader adds the dotted key and
    the file or override that set it."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field_name, self.message = field_name, message


_KINDS: dict[str, type] = {}
TRAIN_KIND = "train"  # the schema of a file without `kind` (train_rl.py jobs)


def register_config(kind: str):
    """Class decorator: ``kind`` in a YAML file selects this dataclass."""

    def deco(cls):
        if not is_dataclass(cls):
            raise TypeError(f"register_config({kind!r}) needs a dataclass, got {cls}")
        _KINDS[kind] = cls
        return cls

    return deco


def config_kinds() -> dict[str, type]:
    _import_builtin_kinds()
    return dict(_KINDS)


def _import_builtin_kinds() -> None:
    # Modules that register job configs; imported lazily so `import rlgen.config` stays light.
    import importlib

    from rlgen.registry import PRETRAINERS

    PRETRAINERS.names()  # imports every pretraining module: their kinds register beside their trainers
    for mod in ("rlgen.runtime.job",):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a missing dependency inside an existing module is a real error
                raise


# ----------------------------------------------------------------------------------------------
# Range checks for __post_init__ (one line each; the loader names the key and its source)
# ----------------------------------------------------------------------------------------------
def check_range(obj, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                hi_open: bool = False, off: float | None = None) -> None:
    """``getattr(obj, name)`` must be a finite number in [lo, hi] (open ends with ``*_open``);
    ``off`` is a value that is always allowed (e.g. 0 = "off" for an interval)."""
    v = getattr(obj, name)
    if v is None or (off is not None and v == off):
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FieldError(name, f"must be a finite number, got {v!r}")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        left = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        right = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
        extra = f" (or {off:g} = off)" if off is not None else ""
        raise FieldError(name, f"must be {' and '.join(x for x in (left, right) if x)}{extra}, got {v!r}")


def check_choice(obj, name: str, choices) -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise FieldError(name, f"must be one of {list(choices)}, got {v!r}")


# ----------------------------------------------------------------------------------------------
# Where each value came from
# ----------------------------------------------------------------------------------------------
class Sources:
    """Dotted key → the file or override that set it (the longest recorded prefix wins)."""

    def __init__(self, default: str):
        self.default, self.by_key = default, {}

    def set(self, key: str, value: Any, src: str) -> None:
        # a mapping value sets every key below it too
        for k in [k for k in self.by_key if k == key or k.startswith(key + ".")]:
            del self.by_key[k]
        self.by_key[key] = src

    def of(self, key: str) -> str:
        parts = key.split(".") if key else []
        for n in range(len(parts), 0, -1):
            hit = self.by_key.get(".".join(parts[:n]))
            if hit is not None:
                return hit
        return self.default


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks
# ----------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str, src: Sources) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = src.of(key)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, src)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: key '{key}': {value!r} is not a {_type_name(tp)}")
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, src)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else Any
            return [_coerce(v, inner, f"{key}[{i}]", src) for i, v in enumerate(value)]
        raise ConfigError(f"{where}: key '{key}' must be a list, got {value!r}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{key}.{k}", src): _coerce(v, vt, f"{key}.{k}", src) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        hint = (" (in a YAML map write 'name: 1.0' with a space after the colon)"
                if value is None and ":" in key else "")
        raise ConfigError(f"{where}: key '{key}' must be a number, got {_short(value)}{hint}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: key '{key}' must be a string, got {_short(value)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: key '{key}' must be one of {list(args)}, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def _build(cls, data: dict, prefix: str, src: Sources):
    hints = typing.get_type_hints(cls)
    resolver = getattr(cls, "__config_types__", None)
    try:
        hints.update(resolver(data) if resolver else {})
    except (KeyError, ValueError) as e:  # e.g. an unknown algo.name
        raise ConfigError(f"{src.of(prefix)}: {prefix + ': ' if prefix else ''}{e.args[0] if e.args else e}") from None
    known = {f.name: f for f in fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in known:
            close = [n for n in known if n.startswith(str(k)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{src.of(full)}: unknown key '{full}' for {cls.__name__}{hint}; "
                              f"valid keys: {', '.join(sorted(known))}")
        kwargs[k] = _coerce(v, hints[k], full, src)
    try:
        return cls(**kwargs)
    except FieldError as e:
        full = f"{prefix}.{e.field_name}" if prefix else e.field_name
        raise ConfigError(f"{src.of(full)}: key '{full}' {e.message}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{src.of(prefix)}: {prefix or cls.__name__}: {e}") from None


def from_dict(cls, data: dict, src: str = "<dict>"):
    """Build dataclass ``cls`` from nested plain data (unknown keys are errors)."""
    return _build(cls, dict(data), "", Sources(src))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Overrides, files and composition
# ----------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{_clip(text)}': expected key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{_clip(text)}': empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{_clip(text)}': cannot parse value: {_yaml_problem(e)}") from None
    return key.split("."), value


def _yaml_where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's message on one line (it spans several, with a caret drawing)."""
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    text = "; ".join(x for x in parts if x) or str(e).splitlines()[0]
    return _clip(" ".join(text.split()))


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def _set_path(data: dict, path: list[str], value: Any, src: str) -> None:
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{src}: cannot set '{'.'.join(path)}': '{part}' is not a mapping")
        node = nxt
    node[path[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}{_yaml_where(e)}: invalid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


WHOLE_KEYS = {"rewards"}  # a file sets these whole: a variant's reward mix must not inherit the base's


def _merge(dst: dict, src_data: dict, sources: Sources, origin: str, prefix: str = "") -> None:
    """Deep-merge ``src_data`` into ``dst`` (mappings key by key), recording each key's origin."""
    for k, v in src_data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        other_algo = key == "algo" and isinstance(v, dict) and isinstance(dst.get(k), dict) and \
            "name" in v and v["name"] != dst[k].get("name")
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and v and key not in WHOLE_KEYS and not other_algo:
            _merge(dst[k], v, sources, origin, key)
        else:
            dst[k] = v
            sources.set(key, v, origin)


def read_composed(path: str | os.PathLike, sources: Sources, _seen: tuple = ()) -> dict:
    """A YAML file with its ``base:`` files merged underneath (bases first, in list order)."""
    p = Path(path)
    if p.resolve() in _seen:
        chain = " -> ".join(str(s) for s in (*_seen, p.resolve()))
        raise ConfigError(f"{p}: 'base' files form a cycle ({chain})")
    data = read_yaml(p)
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{p}: 'base' must be a file name or a list of file names, got {bases!r}")
    out: dict = {}
    for b in bases:
        bp = (p.parent / b) if not Path(b).is_absolute() else Path(b)
        if not bp.is_file():
            raise ConfigError(f"{p}: base config not found: {bp}")
        _merge(out, read_composed(bp, sources, (*_seen, p.resolve())), sources, str(bp))
    _merge(out, data, sources, str(p))
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple = (), schema: type | None = None):
    """Load a job config from YAML (``path`` may be None with ``schema`` given) plus overrides."""
    sources = Sources(str(path) if path is not None else "<overrides>")
    data = read_composed(path, sources) if path is not None else {}
    for ov in overrides:
        keys, value = parse_override(ov)
        where = f"override '{_clip(ov)}'"
        _set_path(data, keys, value, where)
        sources.set(".".join(keys), value, where)
    if schema is None:
        schema = _schema_for(data, sources)
    cfg = _build(schema, data, "", sources)
    cfg._sources = sources  # where each key was set, for checks after loading (not a field: never saved)
    return cfg


def origin_of(cfg, key: str) -> str | None:
    """The file that set ``key`` of a config ``load_config`` built, or "the command line"; None if unknown."""
    src = getattr(cfg, "_sources", None)
    if src is None:
        return None
    where = src.of(key)
    return "the command line" if where.startswith("override ") else where


def _schema_for(data: dict, sources: Sources) -> type:
    kinds = config_kinds()
    kind = data.get("kind")
    if kind is None:
        if "algo" in data and TRAIN_KIND in kinds:
            data["kind"] = TRAIN_KIND
            return kinds[TRAIN_KIND]
        raise ConfigError(f"{sources.of('kind')}: missing 'kind' (one of: {', '.join(sorted(kinds))}) or, for "
                          f"train_rl.py, an 'algo:' section")
    if kind not in kinds:
        hint = (f"; training jobs now name their algorithm instead: drop 'kind' and set algo.name={kind}"
                if kind in ("flow_grpo", "mdm_grpo", "diffusion_dpo", "vrpo", "flow_opd", "mdm_opd") else "")
        raise ConfigError(f"{sources.of('kind')}: unknown kind '{kind}' (one of: {', '.join(sorted(kinds))}){hint}")
    return kinds[kind]


def save_config(cfg, path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, p)
