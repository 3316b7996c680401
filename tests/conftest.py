import os

import torch

# Triton kernels run on the CPU only under the interpreter, and it must be switched on before any kernel
# module is imported (triton.jit reads it at decoration time). On a GPU machine they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
