"""A name -> function registry with one signature per registry and helpful errors.

    ADVANTAGES = Registry("advantage estimator")

    @ADVANTAGES.register("grpo")
    def grpo(...): ...

    ADVANTAGES.get("grpo")   # the function
    ADVANTAGES.get("grp")    # UnknownNameError: unknown advantage estimator 'grp'; did you mean 'grpo'? ...

An entry may declare which optional inputs it needs (`@ADVANTAGES.register("gae", requires=("values",))`),
so a caller decides what to compute (a critic, a greedy baseline) from `requires(name)`, never from the name.
"""

from __future__ import annotations

import difflib
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered. Both a KeyError (lookup) and a ValueError (bad config value)."""

    def __str__(self) -> str:  # KeyError would repr() the message; show it as written
        return str(self.args[0]) if self.args else ""


class Registry:
    """Functions registered by name. `kind` names what they are, for error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._fns: dict[str, Callable] = {}
        self._requires: dict[str, frozenset[str]] = {}

    def register(self, name: str, requires: tuple[str, ...] = ()) -> Callable[[F], F]:
        """Decorator: register `fn` under `name`, needing the optional inputs `requires`. Once per name."""

        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            self._requires[name] = frozenset(requires)
            return fn

        return deco

    def get(self, name: str) -> Callable:
        """The function registered as `name`; `UnknownNameError` naming the closest valid name if none."""
        try:
            return self._fns[name]
        except (KeyError, TypeError):
            pass
        close = difflib.get_close_matches(str(name), self._fns, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}{hint} valid names: {', '.join(self.names())}"
        )

    def requires(self, name: str) -> frozenset[str]:
        """The optional inputs the entry `name` cannot do without (e.g. {"values"} for gae)."""
        self.get(name)
        return self._requires[name]

    def names(self) -> tuple[str, ...]:
        """All registered names, sorted."""
        return tuple(sorted(self._fns))

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __len__(self) -> int:
        return len(self._fns)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={list(self.names())})"
