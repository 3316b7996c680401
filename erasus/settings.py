"""One validation layer for run settings: the same pydantic schemas check ``ErasusUnlearner``'s keyword
arguments and the ``erasus unlearn`` YAML configs, and every failure becomes an :class:`InvalidInputError`
that names the setting (or config key), says what it must be and shows the value given.

Types are strict (``epochs=True``, ``epochs=2.0`` or ``prune_ratio="0.5"`` are refused from Python); a YAML
config is first put through :func:`coerce_config`, because YAML reads ``1e-3`` (no dot) as a string.

    >>> from erasus.settings import UnlearnerSettings, validate
    >>> validate(UnlearnerSettings, {"epochs": 3}).batch_size
    32
    >>> validate(UnlearnerSettings, {"epochs": 0})
    Traceback (most recent call last):
    ...
    erasus.errors.InvalidInputError: epochs must be greater than 0, got 0
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from erasus.errors import InvalidInputError

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]  # a part of a set: neither nothing nor everything
Params = dict[str, Any]


def _named_folder(value: str) -> str:
    if not value.strip():
        raise ValueError("must name a folder")
    return value


Folder = Annotated[str, AfterValidator(_named_folder)]  # a folder name, not blank


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False,
                              populate_by_name=True)


class UnlearnerSettings(_Schema):
    """The plain settings of :class:`erasus.ErasusUnlearner` (the model, strategy, selector, task and LoRA
    config are objects, checked where they are used)."""

    prune_ratio: Annotated[float, Field(gt=0, le=1)] = 0.2
    strategy_params: Params | None = None
    selector_params: Params | None = None
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 32
    copy_model: bool = Field(False, alias="copy")  # not "copy": BaseModel has a method of that name
    seed: int = 0
    out_dir: Folder | Path | None = None
    progress: bool = False
    save_merged: bool = False
    stop_at_target: bool = False
    eval_every: PositiveInt | None = None
    retain_batch_size: PositiveInt | None = None
    overwrite: bool = False
    adaptive: bool = False
    adaptive_chunk: PositiveInt | None = None
    max_rounds: PositiveInt = 8



class _RunConfig(_Schema):
    """Keys every ``erasus unlearn`` config has."""

    strategy: str = "npo"
    strategy_params: Params | None = None
    selector: str | None = "kcenter"
    selector_params: Params | None = None
    epochs: PositiveInt = 5
    seed: int = 0
    out_dir: Folder = "erasus-run"
    adaptive: bool = False
    adaptive_chunk: PositiveInt | None = None
    max_rounds: PositiveInt = 8


class ClassificationConfig(_RunConfig):
    """``erasus unlearn`` on the embedded digits scenarios (``task: classification``, the default)."""

    task: Literal["classification"] = "classification"
    scenario: Literal["class", "random"] = "class"
    forget_class: Annotated[int, Field(ge=0, le=9)] = 3
    forget_fraction: Fraction = 0.1
    prune_ratio: Annotated[float, Field(gt=0, le=1)] = 0.2
    batch_size: PositiveInt = 32


class DataFiles(_Schema):
    """JSON-lines files of question/answer records."""

    forget: str
    retain: str
    holdout: str | None = None


class CausalLMConfig(_RunConfig):
    """``erasus unlearn`` on a causal LM (``task: causal_lm``): a local model folder with ``data`` files, or the
    embedded tiny scenario (``arch``, ``forget_fraction``)."""

    task: Literal["causal_lm", "lm"]
    arch: Literal["gpt2", "llama"] = "gpt2"
    model: str | None = None
    retrained: str | None = None
    data: DataFiles | None = None
    forget_fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.1
    selector: str | None = None
    prune_ratio: Annotated[float, Field(gt=0, le=1)] = 1.0
    batch_size: PositiveInt = 8
    lora: Params | None = None
    save_merged: bool = False
    stop_at_target: bool = False
    max_length: PositiveInt | None = None


S = TypeVar("S", bound=BaseModel)


def validate(schema: type[S], values: dict, where: str = "") -> S:
    """``schema(**values)``, or an :class:`InvalidInputError` listing each bad setting: its name (prefixed by
    ``where``, e.g. ``"run.yaml: config key "``), what it must be, and the value given."""
    if not isinstance(values, dict):
        raise InvalidInputError(f"{where}settings must be a mapping of names to values, got {type(values).__name__}")
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        raise InvalidInputError("; ".join(_describe(exc.errors(), schema, where))) from None


def _describe(errors: list[dict], schema: type[BaseModel], where: str) -> list[str]:
    """One sentence per bad setting (a union's several failures are joined with "or")."""
    by_name: dict[str, list[dict]] = {}
    owner: dict[str, type[BaseModel]] = {}
    for error in errors:
        name, owner_schema = _path(error["loc"], schema)
        by_name.setdefault(name, []).append(error)
        owner[name] = owner_schema
    sentences = []
    for name, group in by_name.items():
        kinds = {error["type"] for error in group}
        if "extra_forbidden" in kinds:
            sentences.append(f"{where}{name!r} is unknown (known: {', '.join(_known(owner[name]))})")
        elif "missing" in kinds:
            sentences.append(f"{where}{name} is required")
        else:
            musts = " or ".join(dict.fromkeys(_must(error) for error in group))
            sentences.append(f"{where}{name} {musts}, got {group[0].get('input')!r}")
    return sentences


def _path(loc: tuple, schema: type[BaseModel]) -> tuple[str, type[BaseModel]]:
    """The dotted setting name in a pydantic error location, without the union-member tags pydantic adds, and
    the schema that owns its last part."""
    parts, current, owner = [], schema, schema
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or part == current.__name__:
            continue  # a union member's tag
        if part not in _aliases(current):  # an unknown key
            parts.append(str(part))
            owner = current
            break
        parts.append(str(part))
        owner, current = current, _nested_model(fields[_aliases(current)[part]].annotation)
    return ".".join(parts) or "settings", owner


def _aliases(schema: type[BaseModel]) -> dict[str, str]:
    """{name a user writes: field name}."""
    return {(field.alias or name): name for name, field in schema.model_fields.items()} | \
        {name: name for name in schema.model_fields}


def _known(schema: type[BaseModel]) -> list[str]:
    return sorted(field.alias or name for name, field in schema.model_fields.items())


def _nested_model(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _must(error: dict) -> str:
    message = _MESSAGES.get(error["type"])
    if message is None:
        return error["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    return message.format(**(error.get("ctx") or {}))


_MESSAGES = {
    "int_type": "must be an integer", "float_type": "must be a number", "bool_type": "must be true or false",
    "string_type": "must be a string", "dict_type": "must be a mapping", "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}", "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}", "literal_error": "must be one of {expected}",
    "finite_number": "must be a finite number", "is_instance_of": "must be a {class}",
}


def coerce_numbers(values):
    """Number-like strings in ``values`` (a mapping, nested mappings included, or one string) as ints or floats;
    everything else unchanged. For parameter mappings whose keys no schema knows (``strategy_params``)."""
    if isinstance(values, dict):
        return {key: coerce_numbers(value) for key, value in values.items()}
    if isinstance(values, str):
        return _number(values)
    return values


def coerce_config(values, schema: type[BaseModel]):
    """A YAML mapping made ready for ``schema``: YAML reads ``1e-3`` (no dot) as a string, so number-like strings
    become numbers where the schema wants a number (``epochs: "5"``, ``lr: 1e-3`` in ``strategy_params``), and
    stay strings where it wants a string (``out_dir: "2024"``). Unknown keys are left for the schema to refuse."""
    if not isinstance(values, dict):
        return values
    known = _aliases(schema)
    out = {}
    for key, value in values.items():
        annotation = schema.model_fields[known[key]].annotation if key in known else None
        nested = _nested_model(annotation)
        if nested is not None:
            out[key] = coerce_config(value, nested)
        elif isinstance(value, dict):
            out[key] = coerce_numbers(value)
        elif isinstance(value, str) and _wants(annotation, (int, float)) and not _wants(annotation, (str,)):
            out[key] = _number(value)
        else:
            out[key] = value
    return out


def _wants(annotation, kinds: tuple[type, ...]) -> bool:
    """Whether ``annotation`` (a type, union or Annotated) accepts one of ``kinds``."""
    if annotation in kinds:
        return True
    return any(_wants(arg, kinds) for arg in get_args(annotation))


def _number(text: str):
    stripped = text.strip()
    if stripped.lstrip("+-").isdigit():
        return int(stripped)
    try:
        value = float(stripped)
    except ValueError:
        return text
    return value if math.isfinite(value) else text  # "nan" and "inf" stay words
