"""VAR models: the multi-scale VQVAE tokenizer, the VAR transformer, their builder and the pieces of sampling."""
from typing import Sequence, Tuple, Union

import torch

from .helpers import make_edit_mask
from .pretrained import HubPushError, PretrainedError, load_pretrained
from .quant import VectorQuantizer2
from .sampling import GumbelSmoothing, KeepInputTokens, LinearGuidance, ScaleDraw, TokenDraw, TopKTopP, sample_next_scale
from .state_dict import CheckpointMismatchError
from .var import VAR
from .vqvae import VQVAE

__all__ = ['build_vae_var', 'VQVAE', 'VAR', 'VectorQuantizer2', 'make_edit_mask', 'CheckpointMismatchError',
           'sample_next_scale', 'LinearGuidance', 'TopKTopP', 'GumbelSmoothing', 'KeepInputTokens', 'ScaleDraw', 'TokenDraw',
           'load_pretrained', 'PretrainedError', 'HubPushError']


def build_vae_var(
    # shared
    device: Union[str, torch.device], patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),   # 10 steps by default
    # VQVAE
    V=4096, Cvae=32, ch=160, share_quant_resi=4,
    # VAR
    num_classes=1000, depth=16, shared_aln=False, attn_l2_norm=True,
    flash_if_available=True, fused_if_available=True,
    init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1,    # init_std < 0: automated
) -> Tuple[VQVAE, VAR]:
    """Build the tokenizer and a VAR of the given depth (width 64·depth, depth heads) directly on `device`.

    device='meta' builds any size without allocating memory (for inspecting shapes).
    """
    heads = depth
    width = depth * 64
    dpr = 0.1 * depth / 24
    patch_nums = tuple(patch_nums)
    device = torch.device(device)

    with torch.device(device):
        vae_local = VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, test_mode=True, share_quant_resi=share_quant_resi, v_patch_nums=patch_nums)
        var_wo_ddp = VAR(
            vae_local=vae_local,
            num_classes=num_classes, depth=depth, embed_dim=width, num_heads=heads, drop_rate=0., attn_drop_rate=0., drop_path_rate=dpr,
            norm_eps=1e-6, shared_aln=shared_aln, cond_drop_rate=0.1,
            attn_l2_norm=attn_l2_norm,
            patch_nums=patch_nums,
            flash_if_available=flash_if_available, fused_if_available=fused_if_available,
        )
    if device.type != 'meta':
        var_wo_ddp.init_weights(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std)
    return vae_local, var_wo_ddp
