"""One registry (name -> class) per family, filled by the classes themselves: ``class X(Base, name="x")``."""
from __future__ import annotations

from erasus.errors import InvalidInputError


def register(registry: dict[str, type], kind: str, cls: type, name: str | None) -> None:
    """Called from a family base class's ``__init_subclass__``; classes without a name stay unregistered."""
    if name is None:
        return
    if name in registry:
        raise InvalidInputError(f"{kind} name {name!r} is already registered to {registry[name]}")
    cls.name = name
    registry[name] = cls


def build(registry: dict[str, type], kind: str, name: str, params: dict):
    if name not in registry:
        raise InvalidInputError(f"unknown {kind} {name!r}; registered: {sorted(registry)}")
    return registry[name](**params)
