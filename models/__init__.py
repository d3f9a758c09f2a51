"""VAR models: the multi-scale VQVAE tokenizer, the VAR transformer, their configs and builders, and the pieces of sampling."""
from typing import Sequence, Tuple, Union

import torch

from .config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig, build_var, build_vqvae
from .helpers import make_edit_mask
from .pretrained import HubPushError, PretrainedError, load_pretrained
from .quant import VectorQuantizer2
from .sampling import GumbelSmoothing, KeepInputTokens, LinearGuidance, ScaleDraw, TokenDraw, TopKTopP, sample_next_scale
from .state_dict import CheckpointMismatchError
from .var import VAR
from .vqvae import VQVAE

__all__ = ['build_vae_var', 'VQVAEConfig', 'VARConfig', 'build_vqvae', 'build_var', 'PATCH_NUMS_256', 'PATCH_NUMS_512',
           'VQVAE', 'VAR', 'VectorQuantizer2', 'make_edit_mask', 'CheckpointMismatchError', 'sample_next_scale',
           'LinearGuidance', 'TopKTopP', 'GumbelSmoothing', 'KeepInputTokens', 'ScaleDraw', 'TokenDraw',
           'load_pretrained', 'PretrainedError', 'HubPushError']


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

    The reference's signature, kept as a thin wrapper over the typed configs: the same as
    `build_vqvae(VQVAEConfig(...), device)` then `build_var(VARConfig(...), vae)` (models/config.py).
    device='meta' builds any size without allocating memory (for inspecting shapes).
    """
    patch_nums = tuple(patch_nums)
    vae_local = build_vqvae(VQVAEConfig(V=V, Cvae=Cvae, ch=ch, share_quant_resi=share_quant_resi, patch_nums=patch_nums), device)
    var_wo_ddp = build_var(VARConfig(depth=depth, num_classes=num_classes, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm,
                                     patch_nums=patch_nums), vae_local, device,
                           flash_if_available=flash_if_available, fused_if_available=fused_if_available,
                           init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std)
    return vae_local, var_wo_ddp
