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
    if not isinstance(name, str):
        raise InvalidInputError(f"{kind} must be a registered name {sorted(registry)}, got {name!r}")
    if name not in registry:
        raise InvalidInputError(f"unknown {kind} {name!r}; registered: {sorted(registry)}")
    if not isinstance(params, dict):
        raise InvalidInputError(f"{kind} parameters must be a mapping, got {type(params).__name__}")
    accepted = parameters(registry[name])
    unknown = sorted(set(params) - accepted) if accepted is not None else []
    if unknown:
        raise InvalidInputError(f"{kind} {name!r} takes no parameter {', '.join(map(repr, unknown))}; its "
                                f"parameters are {sorted(accepted)}")
    return registry[name](**params)


def parameters(cls: type) -> set[str] | None:
    """The keyword parameters ``cls(...)`` accepts, through ``**kwargs`` chains up the class hierarchy
    (None when a ``**kwargs`` reaches no named base, i.e. anything goes)."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        sig = inspect.signature(init)
        names |= {n for n, p in sig.parameters.items() if n != "self" and p.kind in
                  (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return names
    return names
