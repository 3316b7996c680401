"""Every error Erasus raises on purpose derives from :class:`ErasusError`.

Input errors also derive from the builtin a Python user would expect (``ValueError`` or
``TypeError``), so ``except ValueError`` in existing code keeps working.
"""


class ErasusError(Exception):
    """Base class of all Erasus errors."""


class InvalidInputError(ErasusError, ValueError):
    """An argument has the wrong value, shape or content. The message names the argument."""


class ShapeError(InvalidInputError):
    """An array argument has the wrong number of dimensions or mismatched sizes."""


class EmptyInputError(InvalidInputError):
    """An argument that must hold data is empty (zero rows, an empty forget set, ...)."""


class NonFiniteError(InvalidInputError):
    """An argument holds NaN or infinity."""


class DTypeError(InvalidInputError, TypeError):
    """An argument has a dtype the operation does not support."""


class LayoutError(InvalidInputError):
    """An array reaching a compiled kernel is not C-contiguous or not aligned."""


class UnsupportedLayerError(ErasusError, TypeError):
    """A model holds a trainable layer type that a per-sample computation has no function for."""


class BackendUnavailableError(ErasusError, RuntimeError):
    """A backend was requested explicitly but cannot run here (not built, not installed, wrong device)."""
