"""Typed dataclass configs: the single source of truth for every job.

YAML files and ``key=value`` overrides only *set* fields of these dataclasses. An unknown key, a
value of the wrong type or a malformed override is a ``ConfigError`` naming the key and the file.

A job config is a dataclass whose first field is ``kind`` (``flow_pretrain``, ``mdm_pretrain``,
``flow_grpo`` …); ``load_config`` reads ``kind`` from the YAML and builds the class registered for
it with ``@register_config``. Sub-configs are plain nested dataclasses, defined next to the code
that uses them.
"""
from __future__ import annotations

import dataclasses
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


_KINDS: dict[str, type] = {}


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

    for mod in ("rlgen.pretrain.flow_matching", "rlgen.pretrain.masked_diffusion", "rlgen.pretrain.clip",
                "rlgen.pretrain.classifier", "rlgen.pretrain.aesthetic", "rlgen.pretrain.ar_lm",
                "rlgen.runtime.job", "rlgen.runtime.text_trainer", "rlgen.runtime.preference",
                "rlgen.runtime.opd"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a missing dependency inside an existing module is a real error
                raise


# ----------------------------------------------------------------------------------------------
# Common sub-configs shared by every job
# ----------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    name: str = "run"          # runs/<name>/
    root: str = "runs"         # parent folder of run folders
    seed: int = 0
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    resume: str = "no"         # no | auto (latest checkpoint of this run, if any) | <checkpoint dir>
    tensorboard: bool = True
    progress: bool = True      # tqdm progress bars
    num_threads: int = 0       # torch intra-op threads; 0 = leave torch's default

    def __post_init__(self):
        # a name is one folder inside run.root: "../x", "a/b" or "/abs" would write elsewhere
        n = self.name
        if not n or n in (".", "..") or "/" in n or "\\" in n or any(ord(c) < 32 for c in n):
            raise ValueError(f"run.name {n!r} must be a plain folder name (no '/', '\\', '..'); "
                             f"use run.root to choose where run folders go")

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks
# ----------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str, src: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
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
        raise ConfigError(f"{src}: key '{key}': {value!r} is not a {_type_name(tp)}")
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, src)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            inner = args[0] if args else Any
            return [_coerce(v, inner, f"{key}[{i}]", src) for i, v in enumerate(value)]
        raise ConfigError(f"{src}: key '{key}' must be a list, got {value!r}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: key '{key}' must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{key}.{k}", src): _coerce(v, vt, f"{key}.{k}", src) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{src}: key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{src}: key '{key}' must be an integer, got {value!r}")
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
        raise ConfigError(f"{src}: key '{key}' must be a number, got {value!r}{hint}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{src}: key '{key}' must be a string, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{src}: key '{key}' must be one of {list(args)}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str, src: str):
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in known:
            close = [n for n in known if n.startswith(str(k)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{src}: unknown key '{full}' for {cls.__name__}{hint}; "
                              f"valid keys: {', '.join(sorted(known))}")
        kwargs[k] = _coerce(v, hints[k], full, src)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{src}: {prefix or cls.__name__}: {e}") from e
    return obj


def from_dict(cls, data: dict, src: str = "<dict>"):
    """Build dataclass ``cls`` from nested plain data (unknown keys are errors)."""
    return _build(cls, dict(data), "", src)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Overrides and files
# ----------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {e}") from e
    return key.split("."), value


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
        data = yaml_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple = (), schema: type | None = None):
    """Load a job config from YAML (``path`` may be None with ``schema`` given) plus overrides."""
    data = read_yaml(path) if path is not None else {}
    src = str(path) if path is not None else "<overrides>"
    for ov in overrides:
        keys, value = parse_override(ov)
        _set_path(data, keys, value, f"override '{ov}'")
    if schema is None:
        kind = data.get("kind")
        kinds = config_kinds()
        if kind is None:
            raise ConfigError(f"{src}: missing 'kind' (one of: {', '.join(sorted(kinds))})")
        if kind not in kinds:
            raise ConfigError(f"{src}: unknown kind '{kind}' (one of: {', '.join(sorted(kinds))})")
        schema = kinds[kind]
    return _build(schema, data, "", src)


def save_config(cfg, path: str | os.PathLike) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, p)
