"""Which backend runs an op: availability, the per-device default, and explicit overrides.

Rules:
- ``backend=`` (argument) or ``ERASUS_BACKEND`` (environment) is explicit: if that backend cannot run the
  op here, the call raises :class:`BackendUnavailableError` -- an explicit request never silently changes.
  The environment variable only applies to ops that have that backend; the argument must name one of the op's.
- Otherwise the op runs on the fastest correct backend for the tensor's device as measured by ``bench/``
  (``bench/RESULTS.md``): ``cpp`` on CPU, ``triton`` on CUDA. If that one is missing, the op falls back to
  ``reference`` with one warning per missing backend, never an exception.
- The compiled kernels take the element types of :data:`COMPILED_DTYPES` (an op's table may say otherwise):
  floating-point tensors of another dtype (float64, from a float64 model through the layer rules) run on
  ``reference``, silently when the backend was the default's choice, as a :class:`~erasus.errors.DTypeError`
  when it was requested explicitly.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from pathlib import Path

import torch

from erasus.errors import BackendUnavailableError, DTypeError, InvalidInputError

ALL_BACKENDS = ("reference", "cpp", "triton", "faiss")

# Fastest correct backend per device type, from bench/RESULTS.md; the op's own list decides among these.
PREFERRED = {"cpu": ("cpp", "faiss", "reference"), "cuda": ("triton", "faiss", "reference")}

# Floating-point element types the compiled kernels read (csrc/element.h: float, half and bfloat16 bits; the
# Triton kernels load these and accumulate in float32).
COMPILED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_warned: set[str] = set()


#: what the Python side calls in erasus._C (through erasus.ops._cpp.call)
_C_FUNCTIONS = ("kcenter_greedy", "herding", "row_nearest_mean", "row_distances", "kcenter_step", "herding_step",
                "per_sample_grad_norms", "squared_grad_sum", "dual_mask", "dual_select", "dual_sample_keys",
                "dual_sample_ranks", "dual_score_histogram", "max_threads", "last_level_cache_bytes")


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> tuple[bool, str]:
    if name == "reference":
        return True, "plain torch, always available"
    if name == "cpp":
        try:
            ext = importlib.import_module("erasus._C")
        except ImportError as exc:
            package = Path(__file__).resolve().parents[1]
            if (package.parent / "CMakeLists.txt").exists():
                return False, (f"erasus was imported from its source tree ({package}), which has no compiled "
                               "extension: run from another directory (or use the `erasus` command) so that the "
                               "installed package is imported")
            return False, f"compiled extension erasus._C not importable ({exc}); reinstall erasus from source"
        missing = [name for name in _C_FUNCTIONS if not hasattr(ext, name)]
        if missing:  # e.g. an editable checkout whose sources moved on since the extension was built
            return False, (f"erasus._C at {getattr(ext, '__file__', '?')} is older than the Python code (it lacks "
                           f"{', '.join(missing)}); rebuild it: pip install --no-build-isolation -e .")
        threads = ext.max_threads()
        return True, f"erasus._C, OpenMP {'on' if ext.openmp else 'off'}, {threads} thread(s), CPU tensors"
    if name == "triton":
        try:
            triton = importlib.import_module("triton")
            importlib.import_module("erasus.kernels.kcenter")
        except ImportError as exc:
            return False, f"triton not importable ({exc}); pip install triton"
        return True, f"triton {triton.__version__}"
    if name == "faiss":
        try:
            faiss = importlib.import_module("faiss")
        except ImportError as exc:
            return False, f"faiss not importable ({exc}); pip install 'erasus[faiss]'"
        return True, f"faiss {faiss.__version__} (CPU)"
    raise InvalidInputError(f"backend must be one of {ALL_BACKENDS}, got {name!r}")


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backends() -> dict[str, dict[str, object]]:
    """What each backend can do here: ``{name: {"available": bool, "reason": str}}``.

    ``available`` means the backend can run on this machine's default device for it: CPU for ``cpp`` and
    ``faiss``, CUDA for ``triton`` (or CPU under ``TRITON_INTERPRET=1``).
    """
    report = {}
    for name in ALL_BACKENDS:
        ok, why = _probe(name)
        if ok and name == "triton":
            if torch.cuda.is_available():
                why = f"{why} on {torch.cuda.get_device_name()}"
            elif interpreted():
                why = f"{why} under TRITON_INTERPRET=1 (CPU, slow: for tests)"
            else:
                ok, why = False, f"{why} installed, but no CUDA device (CPU runs need TRITON_INTERPRET=1)"
        report[name] = {"available": ok, "reason": why}
    return report


def _runs_on(name: str, device: torch.device) -> tuple[bool, str]:
    ok, why = _probe(name)
    if not ok:
        return ok, why
    if name in ("cpp", "faiss") and device.type != "cpu":
        return False, f"the {name} backend takes CPU tensors, got a tensor on {device}"
    if name == "triton" and device.type == "cpu" and not interpreted():
        return False, "the triton backend takes CUDA tensors (CPU only under TRITON_INTERPRET=1)"
    return True, why


def resolve(op: str, supported: tuple[str, ...], device: torch.device, backend: str | None,
            preferred: dict[str, tuple[str, ...]] | None = None) -> str:
    """Pick the backend that runs ``op`` on ``device``. ``supported`` lists the op's backends; ``preferred``
    overrides the per-device order of :data:`PREFERRED` for this call (an op whose measured winner depends
    on the shape, see bench/RESULTS.md)."""
    explicit, source = backend, "backend="
    if explicit is None:
        env = os.environ.get("ERASUS_BACKEND") or None
        if env is not None and env not in ALL_BACKENDS:
            raise InvalidInputError(f"ERASUS_BACKEND must be one of {ALL_BACKENDS}, got {env!r}")
        if env in supported:
            explicit, source = env, "ERASUS_BACKEND="
    if explicit is not None:
        if explicit not in supported:
            raise InvalidInputError(f"{op}: backend must be one of {supported}, got {explicit!r}")
        ok, why = _runs_on(explicit, device)
        if not ok:
            raise BackendUnavailableError(f"{op}: {source}{explicit!r} cannot run here: {why}")
        return explicit
    for name in (preferred or PREFERRED).get(device.type, ("reference",)):
        if name not in supported:
            continue
        ok, why = _runs_on(name, device)
        if ok:
            return name
        if _probe(name)[0] is False and name not in _warned:
            _warned.add(name)
            warnings.warn(f"erasus: the {name} backend is unavailable ({why}); using the reference backend",
                          RuntimeWarning, stacklevel=3)
    return "reference"


class OpTable:
    """One op's implementations, ``{backend: function}``, every function with the same signature: the one place
    that says which backends an op has. :meth:`select` runs the rules of this module (explicit choice, per-device
    order, fallback warning) and returns the function; each op's public function calls it once.

        >>> table = OpTable("double", {"reference": lambda x: 2 * x})
        >>> table.backends, table.select(torch.device("cpu"), None)(torch.ones(2)).tolist()
        (('reference',), [2.0, 2.0])

    Every table is listed in :data:`OPS` (the test grid reads it, so a new op cannot miss its tests).

    ``dtypes``: ``{backend: floating-point dtypes it takes}`` where it differs from the default (every dtype for
    ``reference`` and ``faiss``, :data:`COMPILED_DTYPES` for ``cpp`` and ``triton``). A function :meth:`select`
    returns for a backend with such a limit checks its floating-point tensor arguments when called, and runs
    ``reference`` on others (or raises DTypeError if the backend was explicit).

        >>> table = OpTable("triple", {"reference": lambda x: 3 * x, "cpp": lambda x: x.numpy()})
        >>> table.select(torch.device("cpu"), None)(torch.ones(1, dtype=torch.float64)).dtype   # cpp takes no float64
        torch.float64"""

    def __init__(self, op: str, implementations: dict, dtypes: dict[str, tuple[torch.dtype, ...]] | None = None):
        unknown = set(implementations) - set(ALL_BACKENDS)
        if "reference" not in implementations or unknown:
            raise InvalidInputError(f"{op}: an op needs a 'reference' implementation and only backends of "
                                    f"{ALL_BACKENDS}, got {sorted(implementations)}")
        self.op = op
        self.implementations = dict(implementations)
        self.backends = tuple(name for name in ALL_BACKENDS if name in implementations)
        self.dtypes = {"cpp": COMPILED_DTYPES, "triton": COMPILED_DTYPES, **(dtypes or {})}
        OPS[op] = self

    def resolve(self, device: torch.device, backend: str | None,
                preferred: dict[str, tuple[str, ...]] | None = None) -> str:
        """The backend's name (see :func:`resolve`)."""
        return resolve(self.op, self.backends, device, backend, preferred)

    def select(self, device: torch.device, backend: str | None,
               preferred: dict[str, tuple[str, ...]] | None = None):
        """The implementation that runs on ``device`` (see :func:`resolve`), guarded by the backend's dtypes."""
        name = self.resolve(device, backend, preferred)
        if name not in self.dtypes:
            return self.implementations[name]
        return functools.partial(self._within_dtypes, name, backend is not None or name == os.environ.get(
            "ERASUS_BACKEND"))

    def _within_dtypes(self, name: str, explicit: bool, *args):
        """Run backend ``name`` if it takes the dtypes of the floating-point tensor arguments, else ``reference``
        (an explicit backend raises instead)."""
        other = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype.is_floating_point
                      and a.dtype not in self.dtypes[name]), None)
        if other is None:
            return self.implementations[name](*args)
        if explicit:
            raise DTypeError(f"{self.op}: backend {name!r} takes {[str(d) for d in self.dtypes[name]]} tensors, got "
                             f"{other}; pass backend='reference' (or leave backend unset) for {other}")
        return self.implementations["reference"](*args)

    def __repr__(self) -> str:
        return f"OpTable({self.op!r}, backends={self.backends})"


#: every op's table, by the op's public name
OPS: dict[str, OpTable] = {}
