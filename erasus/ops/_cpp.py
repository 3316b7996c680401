"""Calls into the compiled extension erasus._C through zero-copy numpy views of torch tensors.

bfloat16 has no numpy dtype: it is handed over as an int16 view of the same memory and widened in C++.
Array errors raised by the extension are re-raised as the matching ErasusError.
"""
from __future__ import annotations

import contextlib

import torch

from erasus import errors

_ELEM = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _ext():
    from erasus import _C

    return _C


def as_numpy(t: torch.Tensor):
    """A numpy view sharing t's memory (bfloat16 as int16). Never copies."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


@contextlib.contextmanager
def _translated_errors():
    ext = _ext()
    try:
        yield
    except ext.ArrayDTypeError as exc:
        raise errors.DTypeError(str(exc)) from exc
    except ext.ArrayLayoutError as exc:
        raise errors.LayoutError(str(exc)) from exc
    except ext.ArrayShapeError as exc:
        raise errors.ShapeError(str(exc)) from exc
    except TypeError as exc:  # pybind11 refused an argument (noconvert): not a numpy array, or not castable
        raise errors.DTypeError(f"erasus._C rejected an argument: {exc}") from exc


def call(fn_name: str, *args):
    """Run erasus._C.<fn_name>(*args); array arguments are numpy views (see as_numpy)."""
    fn = getattr(_ext(), fn_name)
    with _translated_errors():
        return fn(*args)


def elem_name(dtype: torch.dtype) -> str:
    return _ELEM[dtype]
