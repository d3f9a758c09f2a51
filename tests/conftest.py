"""Shared fixtures: the reference data folder and tiny models."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get('VAR_REFERENCE_DIR', REPO.parent / 'shared' / 'reference'))

TINY = dict(V=64, Cvae=8, ch=32, share_quant_resi=4, patch_nums=(1, 2, 3, 4), num_classes=5, depth=2)


def reference_file(name: str) -> Path:
    """Path of a reference file; skips the test, saying where it was looked for, when it is absent."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f'reference file {path} is absent (set VAR_REFERENCE_DIR to the folder holding {name})')
    return path


def build_tiny(seed: int = 0, **overrides):
    """A tiny tokenizer + VAR on the CPU with every parameter randomised (no branch near zero)."""
    from models import build_vae_var
    kw = dict(TINY, flash_if_available=False, fused_if_available=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    vae, var = build_vae_var(device='cpu', **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(vae.named_parameters()) + list(var.named_parameters()):
            if name.endswith('scale_mul_1H11'):
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and 'embedding' not in name and 'emb' not in name and 'pos_' not in name:
                p.copy_(noise / (p[0].numel() ** 0.5))      # weights: unit-scale activations
            elif p.ndim == 1 and name.endswith('weight'):
                p.copy_(1 + 0.1 * noise)                      # norm weights
            else:
                p.copy_(0.5 * noise if p.ndim >= 2 else 0.1 * noise)  # embeddings, positions, biases
    vae.eval()
    var.eval()
    return vae, var


@pytest.fixture
def tiny():
    return build_tiny()
