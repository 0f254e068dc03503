"""YAML file + dotted command-line overrides -> a validated, frozen RunConfig, and back to YAML; the one-line
ConfigError that describes every validation problem after where its key was set."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.config.run import RunConfig
from posttrain.config.sections import _suggest
from posttrain.errors import ConfigError


def _fields_at(loc: tuple) -> list[str]:
    """Valid field names of the section that holds the key at `loc`."""
    model: Any = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


COMMAND_LINE = "command line"


def _key_paths(tree: dict, prefix: tuple = ()) -> set[tuple]:
    """Every key path a nested dict sets, sections included: {"rl": {"lr": 1}} -> {("rl",), ("rl", "lr")}."""
    paths = set()
    for key, value in tree.items():
        paths.add((*prefix, str(key)))
        if isinstance(value, dict):
            paths |= _key_paths(value, (*prefix, str(key)))
    return paths


def _origin(keys: list[tuple], cli: set[tuple], file: set[tuple], source: str | None) -> str | None:
    """Where the keys an error is about were set: the command line if any of them was set there (it wins over
    the file), else `source` (the YAML file); a key set in neither is placed by its nearest section."""
    origins = set()
    for key in keys:
        for n in range(len(key), 0, -1):
            if key[:n] in cli or key[:n] in file:
                origins.add(COMMAND_LINE if key[:n] in cli else source)
                break
    return COMMAND_LINE if COMMAND_LINE in origins else source if source in origins else None


def _describe(err: ValidationError, cli: set[tuple] = frozenset(), file: set[tuple] = frozenset(),
              source: str | None = None) -> str:
    """One line for every problem, each after where its key was set (`source: ...; command line: ...`)."""
    parts: dict[str | None, list[str]] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        keys = [tuple(str(p) for p in loc)]
        if e["type"] == "extra_forbidden":
            prefix = ".".join(str(p) for p in loc[:-1])
            valid = [f"{prefix}.{f}" if prefix else f for f in _fields_at(loc)]
            text = f"unknown config key '{key}'{_suggest(key, valid)}"
        elif e["type"] in ("value_error", "assertion_error"):
            msg = str(e["msg"]).removeprefix("Value error, ")
            text = msg if not key or msg.startswith(key) else f"{key}: {msg}"
            named = [tuple(k.split(".")) for k in re.findall(r"\b[a-z_]+(?:\.[a-z_0-9]+)+", msg)]
            keys = [k for k in named if k in cli or k in file] or keys  # a check across keys names them
        else:
            text = f"{key or 'config'}: {e['msg']} (got {e.get('input')!r})"
        parts.setdefault(_origin(keys, cli, file, source), []).append(text)
    return "; ".join(f"{where}: {'; '.join(texts)}" if where else "; ".join(texts) for where, texts in parts.items())


def parse_overrides(overrides: list[str]) -> dict:
    """`["rl.lr=1e-4", "seed=3"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. rl.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return tree


def merge_trees(base: dict, extra: dict) -> dict:
    """`base` with `extra` on top, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def build_config(data: dict | None = None, overrides: list[str] | None = None, source: str | None = None,
                 defaults: dict | None = None) -> RunConfig:
    """Validate `defaults` < `data` < overrides into a frozen RunConfig; raise ConfigError on any problem, its
    message attributed to `source` (the file `data` was read from) or to the command line (the overrides)."""
    try:
        tree = parse_overrides(overrides or [])
    except ConfigError as err:
        raise ConfigError(f"{COMMAND_LINE}: {err}") from None
    try:
        return RunConfig.model_validate(merge_trees(merge_trees(defaults or {}, data or {}), tree))
    except ValidationError as err:
        raise ConfigError(_describe(err, _key_paths(tree), _key_paths(data or {}), source)) from None


def read_yaml(path: str | Path | None) -> dict:
    """A YAML config file's top-level mapping ({} for None); ConfigError names the file and line."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys")
    return loaded or {}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (None: the embedded defaults), apply dotted overrides, validate once."""
    return build_config(read_yaml(path), overrides, source=None if path is None else str(path))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML (loads back to an equal RunConfig)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
