import os

import pytest
import torch

# Triton kernels run on the CPU only under the interpreter, and it must be switched on before any kernel
# module is imported (triton.jit reads it at decoration time). On a GPU machine they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def erasus_cache(tmp_path_factory):
    """Models trained by the tests are cached in a temporary folder, never in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ERASUS_CACHE", str(tmp_path_factory.mktemp("erasus-cache")))
    yield
    mp.undo()
