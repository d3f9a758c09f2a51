"""The builders: a tokenizer and a VAR of their configs (models/config.py), and the reference's build_vae_var."""
import contextlib
from typing import Optional, Sequence, Tuple, Union

import torch

from .config import PATCH_NUMS_256, VARConfig, VQVAEConfig, check_scales, configs_from_vae_var_kwargs, var_build_args, vqvae_build_args
from .var import VAR
from .vqvae import VQVAE

__all__ = ['build_vqvae', 'build_var', 'build_vae_var']


def _on(device: Optional[Union[str, torch.device]]):
    return contextlib.nullcontext() if device is None else torch.device(device)


def build_vqvae(cfg: VQVAEConfig, device: Optional[Union[str, torch.device]] = None, test_mode: bool = True,
                beta: float = 0.25) -> VQVAE:
    """The tokenizer of `cfg` on `device` (None: the default device). test_mode: frozen, in eval mode (for VAR);
    beta: the commitment weight of its training loss."""
    with _on(device):
        return VQVAE(**vqvae_build_args(cfg), beta=beta, test_mode=test_mode)


def build_var(cfg: VARConfig, vae: VQVAE, device: Optional[Union[str, torch.device]] = None,
              flash_if_available: bool = True, fused_if_available: bool = True,
              init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1) -> VAR:
    """The VAR of `cfg` over the tokenizer `vae`, on `device` (None: the tokenizer's), initialised (init_std < 0:
    automated) unless on the meta device. Its scales must be the tokenizer's."""
    check_scales(cfg, vae.quantize.v_patch_nums)
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    with torch.device(device):
        var = VAR(vae_local=vae, **var_build_args(cfg), flash_if_available=flash_if_available, fused_if_available=fused_if_available)
    if device.type != 'meta':
        var.init_weights(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std)
    return var


def build_vae_var(
    # shared
    device: Union[str, torch.device], patch_nums: Sequence[int] = PATCH_NUMS_256,   # 10 steps by default
    # VQVAE
    V=4096, Cvae=32, ch=160, share_quant_resi=4,
    # VAR
    num_classes=1000, depth=16, shared_aln=False, attn_l2_norm=True,
    flash_if_available=True, fused_if_available=True,
    init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1,    # init_std < 0: automated
) -> Tuple[VQVAE, VAR]:
    """Build the tokenizer and a VAR of the given depth (width 64·depth, depth heads) directly on `device`.

    The reference's signature, kept as a thin wrapper over the typed configs: its shape keywords map onto
    VQVAEConfig / VARConfig through models.config.VAE_VAR_KWARGS, then build_vqvae and build_var build them.
    device='meta' builds any size without allocating memory (for inspecting shapes).
    """
    vqvae, var = configs_from_vae_var_kwargs(dict(patch_nums=patch_nums, V=V, Cvae=Cvae, ch=ch, share_quant_resi=share_quant_resi,
                                                  num_classes=num_classes, depth=depth, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm))
    vae_local = build_vqvae(vqvae, device)
    var_wo_ddp = build_var(var, vae_local, device, flash_if_available=flash_if_available, fused_if_available=fused_if_available,
                           init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std)
    return vae_local, var_wo_ddp
