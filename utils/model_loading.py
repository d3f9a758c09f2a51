"""Build the tokenizer and VAR for sampling from a trainer checkpoint, plain state dicts, or the published files."""
import logging
from typing import Dict, Optional, Tuple

import torch

from models import VAR, VQVAE, build_vae_var
from models.state_dict import PATCH_NUMS_256, PATCH_NUMS_512, PUBLISHED, published_build_kwargs
from utils.arg_util import parse_patch_nums
from utils.cli import UserError
from utils.hub import resolve_checkpoint

__all__ = ['load_for_sampling', 'model_flags_help']

logger = logging.getLogger(__name__)


def _load(path: str):
    return torch.load(path, map_location='cpu', weights_only=True)


def _vae_state(obj):
    if isinstance(obj, dict) and isinstance(obj.get('trainer'), dict) and 'vae_wo_ddp' in obj['trainer']:
        return obj['trainer']['vae_wo_ddp']   # a train_vae.py checkpoint
    return obj


def load_for_sampling(device: torch.device, var_ckpt: str = '', vae_ckpt: str = 'vae_ch160v4096z32.pth', depth: int = 16,
                      pn: str = '', saln: Optional[bool] = None, anorm: bool = True, vocab_size: int = 4096, z_channels: int = 32,
                      vae_ch: int = 160, share_quant_resi: int = 4, num_classes: int = 1000, ema: bool = False,
                      fuse: bool = True) -> Tuple[VQVAE, VAR, Dict]:
    """(tokenizer, VAR, build arguments), both in eval mode on `device`.

    var_ckpt: a train.py checkpoint (ar-ckpt-*.pth: its args define the model, its `vae_local` the
    tokenizer, --ema picks `var_ema`), a plain VAR state dict (built from the flags), or '' for the
    published var_d{depth}.pth (local file of that name, else downloaded from FoundationVision/var).
    """
    trainer_ckpt = None
    if var_ckpt:
        obj = _load(resolve_checkpoint(var_ckpt, downloadable=False))
        if isinstance(obj, dict) and isinstance(obj.get('trainer'), dict) and 'var_wo_ddp' in obj['trainer']:
            trainer_ckpt = obj
        elif ema:
            raise UserError(f'--ema picks the EMA weights of a train.py checkpoint, but {var_ckpt} is a plain state dict')
        else:
            var_state = obj
    else:
        name = f'var_d{depth}.pth'
        if name not in PUBLISHED:
            raise UserError(f'there is no published VAR of depth {depth}: use --depth 16, 20, 24, 30 or 36, or --var_ckpt')
        if ema:
            raise UserError('--ema picks the EMA weights of a train.py checkpoint; the published files have none')
        var_state = _load(resolve_checkpoint(name))

    if trainer_ckpt is not None:
        a = trainer_ckpt['args']
        kw = dict(patch_nums=tuple(a['patch_nums']), V=a['vocab_size'], Cvae=a['z_channels'], ch=a['vae_ch'],
                  share_quant_resi=a['share_quant_resi'], num_classes=a['num_classes'], depth=a['depth'], shared_aln=a['saln'],
                  attn_l2_norm=a['anorm'])
        if ema and 'var_ema' not in trainer_ckpt['trainer']:
            raise UserError(f'--ema: {var_ckpt} has no EMA weights (it was trained without --ema)')
        var_state = trainer_ckpt['trainer']['var_ema' if ema else 'var_wo_ddp']
        vae_state = trainer_ckpt['trainer']['vae_local']
        source = f'{var_ckpt} ({"EMA" if ema else "trained"} weights, epoch {trainer_ckpt["epoch"]}, iteration {trainer_ckpt["iter"]})'
    else:
        published = published_build_kwargs(f'var_d{depth}.pth') if f'var_d{depth}.pth' in PUBLISHED and not var_ckpt else {}
        patch_nums = parse_patch_nums(pn) if pn else published.get('patch_nums', PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256)
        kw = dict(patch_nums=tuple(patch_nums), V=vocab_size, Cvae=z_channels, ch=vae_ch, share_quant_resi=share_quant_resi,
                  num_classes=num_classes, depth=depth, shared_aln=published.get('shared_aln', depth == 36) if saln is None else saln,
                  attn_l2_norm=anorm)
        vae_state = _vae_state(_load(resolve_checkpoint(vae_ckpt)))
        source = var_ckpt or f'var_d{depth}.pth'
    vae, var = build_vae_var(device=device, flash_if_available=fuse, fused_if_available=fuse, **kw)
    vae.load_state_dict(vae_state, strict=True)
    var.load_state_dict(var_state, strict=True)
    vae.eval()
    var.eval()
    logger.info('VAR d%d from %s; %d classes, scales %s', kw['depth'], source, kw['num_classes'], kw['patch_nums'])
    return vae, var, kw


def model_flags_help() -> str:
    return ('model: --var_ckpt (train.py checkpoint or state dict; empty: the published var_d{depth}.pth), --vae_ckpt, --depth, '
            '--pn, --saln, --vocab_size, --z_channels, --vae_ch, --share_quant_resi, --num_classes, --ema')
