"""Triton kernels, installed as ``erasus.kernels``. One kernel family per file; they know tensors only."""
