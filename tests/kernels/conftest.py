"""Kernel tests: Triton kernels run in the interpreter on CPU-only machines.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before the
``kernels.*_triton`` modules are imported; the dispatchers only import those on CUDA, and the
tests import them after this conftest has run."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
