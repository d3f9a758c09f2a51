"""Build the tokenizer and VAR for sampling from a trainer checkpoint, plain state dicts, or the published files."""
import logging
from typing import Dict, Tuple

import torch

from models import VAR, VQVAE, build_vae_var
from models.state_dict import PATCH_NUMS_256, PATCH_NUMS_512, PUBLISHED, published_build_kwargs
from utils.arg_util import ModelFlags, parse_patch_nums
from utils.cli import UserError
from utils.hub import resolve_checkpoint

__all__ = ['load_for_sampling']

logger = logging.getLogger(__name__)


def _load(path: str):
    return torch.load(path, map_location='cpu', weights_only=True)


def _vae_state(obj):
    if isinstance(obj, dict) and isinstance(obj.get('trainer'), dict) and 'vae_wo_ddp' in obj['trainer']:
        return obj['trainer']['vae_wo_ddp']   # a train_vae.py checkpoint
    return obj


def load_for_sampling(device: torch.device, flags: ModelFlags) -> Tuple[VQVAE, VAR, Dict]:
    """(tokenizer, VAR, build arguments), both in eval mode on `device`.

    flags.var_ckpt: a train.py checkpoint (ar-ckpt-*.pth: its args define the model, its `vae_local` the
    tokenizer, --ema picks `var_ema`), a plain VAR state dict (built from the flags), or '' for the
    published var_d{depth}.pth (local file of that name, else downloaded from FoundationVision/var).
    """
    var_ckpt, vae_ckpt, depth, ema = flags.var_ckpt, flags.vae_ckpt, flags.depth, flags.ema
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
        patch_nums = parse_patch_nums(flags.pn) if flags.pn else published.get('patch_nums', PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256)
        kw = dict(patch_nums=tuple(patch_nums), V=flags.vocab_size, Cvae=flags.z_channels, ch=flags.vae_ch,
                  share_quant_resi=flags.share_quant_resi, num_classes=flags.num_classes, depth=depth,
                  shared_aln=published.get('shared_aln', depth == 36) if flags.saln is None else flags.saln, attn_l2_norm=flags.anorm)
        vae_state = _vae_state(_load(resolve_checkpoint(vae_ckpt)))
        source = var_ckpt or f'var_d{depth}.pth'
    vae, var = build_vae_var(device=device, flash_if_available=flags.fuse, fused_if_available=flags.fuse, **kw)
    vae.load_state_dict(vae_state, strict=True)
    var.load_state_dict(var_state, strict=True)
    vae.eval()
    var.eval()
    logger.info('VAR d%d from %s; %d classes, scales %s', kw['depth'], source, kw['num_classes'], kw['patch_nums'])
    return vae, var, kw
