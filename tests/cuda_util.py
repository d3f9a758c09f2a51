"""What the CUDA tests (tests/test_cuda_*.py) share: the marks that skip them without a GPU, exact float32, tiny models on CUDA."""
import contextlib

import pytest
import torch

from conftest import build_tiny

NO_GPU_REASON = 'needs an NVIDIA GPU: torch.cuda.is_available() is False here (tools/gpu_check.sh runs these tests on a GPU machine)'
DEVICE = torch.device('cuda')
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU_REASON)]


@contextlib.contextmanager
def ieee_fp32():
    """Float32 matmuls and convolutions in full float32 inside the block (TensorFloat32 off), as on the CPU."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def tiny_on_cuda(seed: int = 0, **overrides):
    """conftest.build_tiny's tokenizer and VAR (randomised weights, SDPA attention), moved to the GPU."""
    vae, var = build_tiny(seed=seed, **overrides)
    return vae.to(DEVICE), var.to(DEVICE)


def max_rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1.0) -> float:
    """max |got − want| / max(floor, max |want|): with floor 1 an absolute error for values up to order one and a
    relative one above; with floor 0 relative to the largest value (for gradients, whatever their scale)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(max(floor, 1e-30))).item()
