"""Reward functions named in a config: `module:function`, `module:factory(args)`, or `path/to/file.py:function`.

    rl.reward_funcs: ["my_rewards:exact_match", "posttrain.rewards:tag_format_reward(answer)"]
    rl.reward_weights: [1.0, 0.1]

    rewards = resolve_rewards(specs, weights)     # a RewardSet; ConfigError naming the entry otherwise
    require_columns(rewards, columns, where)      # every column a function asks for by name is in the data

A spec's part after the colon is an attribute path (`module:Class.method` works) optionally called once with
literal arguments (numbers, strings, lists, None, True/False; a bare word is a string: `tag_format_reward(answer)`
is `tag_format_reward("answer")`), as a factory that returns the reward function. A module is imported from the
installed packages or, failing that, from the current directory (as `python -m` would); a spec whose module part
ends in `.py` is that file. Nothing here runs before a recipe asks for it, and a missing module, a missing
function, a factory that raises, or a result that is not callable is one line naming `rl.reward_funcs[i]`.

Python callables (the API, posttrain/api.py) are registered under a spec with `inline_spec`, so a run's
config.yaml still names every reward function; such a spec resolves only in the process that registered it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from posttrain.errors import ConfigError
from posttrain.rewards.base import RewardSet, reward_name

_INLINE: dict[str, Callable] = {}  # "inline:<name>" -> a callable given to the Python API in this process
INLINE_PREFIX = "inline:"


def inline_spec(fn: Callable) -> str:
    """The spec that names `fn` in a config: `module:qualname` when importing it gives `fn` back (a function
    defined at the top of a module, the running script's `__main__` included), else `inline:<name>`,
    registered for this process."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module and qualname and "<" not in qualname:
        try:
            if _attribute(importlib.import_module(module), qualname) is fn:
                return f"{module}:{qualname}"
        except (ImportError, AttributeError):
            pass
    name = reward_name(fn)
    spec, n = f"{INLINE_PREFIX}{name}", 1
    while spec in _INLINE and _INLINE[spec] is not fn:
        n += 1
        spec = f"{INLINE_PREFIX}{name}_{n}"
    _INLINE[spec] = fn
    return spec


def _attribute(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _import(module: str, key: str):
    """The module named `module` (a dotted name, or a .py file path), or a ConfigError naming `key`."""
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise ConfigError(f"{key}: no such file {module}")
        name = f"posttrain_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(loaded)
        except Exception as exc:  # noqa: BLE001 - the user's file: one line with what it raised
            raise ConfigError(f"{key}: importing {module} raised {type(exc).__name__}: {exc}") from None
        return loaded
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module.split(".")[0] and exc.name != module:
            raise ConfigError(f"{key}: importing {module} failed: {exc}") from None
        cwd = str(Path.cwd())
        if cwd in sys.path:
            raise ConfigError(f"{key}: no module named {module!r} (not installed, not in {cwd})") from None
        sys.path.append(cwd)  # a module beside the user's config, as `python -m` would find it
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError:
            raise ConfigError(f"{key}: no module named {module!r} (not installed, not in {cwd})") from None
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{key}: importing {module} raised {type(exc).__name__}: {exc}") from None


def _literal(node: ast.expr, key: str):
    if isinstance(node, ast.Name):  # a bare word: tag_format_reward(answer)
        return node.id
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ConfigError(f"{key}: arguments must be literals (numbers, strings, lists), got "
                          f"{ast.unparse(node)!r}") from None


def resolve_reward(spec: str, key: str = "rl.reward_funcs[0]") -> Callable:
    """The reward function a spec names (see the module docstring)."""
    if spec.startswith(INLINE_PREFIX):
        if spec not in _INLINE:
            raise ConfigError(f"{key}: {spec!r} names a Python callable given to posttrain.fit in another "
                              "process; name it as module:function to run it from a config")
        return _INLINE[spec]
    module, sep, rest = spec.partition(":")  # the first colon: arguments may hold colons
    if not sep or not module or not rest:
        raise ConfigError(f"{key}: {spec!r} is not 'module:function' (e.g. 'my_rewards:exact_match')")
    try:
        expr = ast.parse(rest.strip(), mode="eval").body
    except SyntaxError:
        raise ConfigError(f"{key}: {rest!r} is not a function name or a call such as 'factory(arg)'") from None
    call = expr if isinstance(expr, ast.Call) else None
    target = call.func if call else expr
    if not isinstance(target, (ast.Name, ast.Attribute)):
        raise ConfigError(f"{key}: {rest!r} is not a function name or a call such as 'factory(arg)'")
    path = ast.unparse(target)
    if module == "__main__" and not hasattr(sys.modules.get("__main__"), path.split(".")[0]):
        raise ConfigError(f"{key}: {spec!r} is a function of the Python script that started that run; this process "
                          "has no such function: put it in a module and name it as module:function, or call "
                          "posttrain.fit / posttrain.evaluate from the script")
    loaded = _import(module, key)
    try:
        fn = _attribute(loaded, path)
    except AttributeError:
        public = sorted(n for n, v in vars(loaded).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"{key}: module {module} has no {path!r} (it has {', '.join(public[:12]) or 'nothing callable'})"
                          ) from None
    if call is not None:
        args = [_literal(a, key) for a in call.args]
        kwargs = {k.arg: _literal(k.value, key) for k in call.keywords}
        try:
            fn = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{key}: {rest} raised {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r} is a {type(fn).__name__}, not a reward function")
    return fn


def resolve_rewards(specs: Sequence[str], weights: Sequence[float] | None = None) -> RewardSet:
    """A RewardSet of the named functions (weight 1 each unless `weights` gives one per function), named by
    each function's name; two functions of the same name get their spec's position appended."""
    if weights is not None and len(weights) != len(specs):
        raise ConfigError(f"rl.reward_weights has {len(weights)} values for {len(specs)} rl.reward_funcs")
    fns: dict[str, tuple[Callable, float]] = {}
    for i, spec in enumerate(specs):
        fn = resolve_reward(spec, f"rl.reward_funcs[{i}]")
        name = reward_name(fn)
        name = name if name not in fns else f"{name}_{i}"
        fns[name] = (fn, 1.0 if weights is None else float(weights[i]))
    return RewardSet(fns)


def required_columns(fn: Callable) -> list[str]:
    """The data columns `fn` takes by name without a default (its parameters after prompts and completions)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return []
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for p in named[2:] if p.default is p.empty]


def require_columns(rewards: RewardSet, columns: Sequence[str], where: str) -> None:
    """ConfigError when a reward function asks for a column the data does not have."""
    have = set(columns)
    for name, fn in rewards.fns.items():
        missing = [c for c in required_columns(fn) if c not in have]
        if missing:
            raise ConfigError(f"reward {name} needs the column {missing[0]!r}, which {where} does not have (it has "
                              f"{', '.join(sorted(have)) or 'no columns'})")
