"""Bit-for-bit reproducible runs. On CPU a run is a pure function of its config and seed (same machine, same
torch build, same number of threads): every random choice comes from a seeded generator. On CUDA some kernels
(cuBLAS split-K reductions, atomics in scatter/index_add, cuDNN autotuning) vary from run to run; `deterministic=true`
asks for the deterministic implementations at some speed cost."""

from __future__ import annotations

import os

import torch


def enable_determinism() -> None:
    """torch.use_deterministic_algorithms + the cuBLAS workspace setting it requires + no cuDNN autotuning.

    CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS starts, so call this before the first CUDA matmul (the run
    does it before building anything); an existing value is kept. `warn_only`: an op without a deterministic CUDA
    implementation warns (naming the op) instead of stopping the run."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
