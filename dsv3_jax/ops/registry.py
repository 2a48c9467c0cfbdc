"""A name -> implementation table for one operation; its keys are the variants' only spelling."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)
AUTO = "auto"  # not a variant: "let ops.dispatch choose" wherever a variant name is asked for


class Registry(Generic[F]):
    """Variants of `op`, one of which, `reference`, is the plain definition the others must equal."""

    def __init__(self, op: str, reference: str):
        self.op, self.reference = op, reference
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.op}: variant {name!r} is registered twice")
            self._fns[name] = fn
            return fn

        return add

    def __getitem__(self, name: str) -> F:
        if name not in self._fns:
            raise ValueError(f"{self.op}: unknown variant {name!r}; known: {', '.join(self.names)}")
        return self._fns[name]

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self._fns)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._fns)
