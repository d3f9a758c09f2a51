"""Build the tokenizer and VAR for sampling from a trainer checkpoint, plain state dicts, or the published files."""
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Collection, Dict, Mapping, Tuple

import torch
import torch.nn as nn

from models import VAR, VQVAE, build_vae_var
from models.state_dict import PATCH_NUMS_256, PATCH_NUMS_512, PUBLISHED, published_build_kwargs
from utils.arg_util import FlagError, ModelFlags, parse_patch_nums
from utils.cli import UserError
from utils.hub import resolve_checkpoint
from utils.reference_ckpt import complete_reference_args, is_reference_ckpt

__all__ = ['SamplingWeights', 'read_weights', 'build_from_weights', 'load_for_sampling', 'state_fingerprint']

logger = logging.getLogger(__name__)

# model flag → key of a train.py checkpoint's args (the checkpoint defines the model; an explicit flag must agree)
_CKPT_ARG_OF_FLAG = {'depth': 'depth', 'pn': 'patch_nums', 'saln': 'saln', 'anorm': 'anorm', 'vocab_size': 'vocab_size',
                     'z_channels': 'z_channels', 'vae_ch': 'vae_ch', 'share_quant_resi': 'share_quant_resi'}


@dataclass
class SamplingWeights:
    """What the weight files say, before any model is built."""
    kw: Dict             # build_vae_var arguments (besides device and kernels)
    var_state: Mapping[str, torch.Tensor]
    vae_state: Mapping[str, torch.Tensor]
    source: str          # where the VAR weights come from, for the log
    vae_source: str      # where the tokenizer's come from


def _load(path: str):
    return torch.load(path, map_location='cpu', weights_only=True)


def _vae_state(obj):
    if isinstance(obj, dict) and isinstance(obj.get('trainer'), dict) and 'vae_wo_ddp' in obj['trainer']:
        return obj['trainer']['vae_wo_ddp']   # a train_vae.py checkpoint
    return obj


def _flag_value(flags: ModelFlags, name: str):
    return tuple(parse_patch_nums(flags.pn)) if name == 'pn' else getattr(flags, name)


def _check_flags_against_trainer_args(path: str, a: Mapping, flags: ModelFlags, given: Collection[str]) -> None:
    """Model flags given on the command line must agree with the checkpoint's args, which define the model."""
    diffs = []
    for flag, key in _CKPT_ARG_OF_FLAG.items():
        if flag not in given or key not in a:
            continue
        mine, theirs = _flag_value(flags, flag), a[key]
        theirs = tuple(theirs) if flag == 'pn' else theirs
        if mine != theirs:
            shown = '_'.join(map(str, theirs)) if flag == 'pn' else theirs
            diffs.append(f'--{flag}={getattr(flags, flag)} (the checkpoint: {shown})')
    if diffs:
        raise FlagError(f'{path} is a train.py checkpoint whose args define the model, and these flags disagree with it: '
                        f'{"; ".join(diffs)}. Drop them (the checkpoint\'s values are used), or pass the checkpoint you meant')
    if 'vae_ckpt' in given:
        raise FlagError(f'--vae_ckpt={flags.vae_ckpt}: {path} is a train.py checkpoint that carries its own tokenizer '
                        f'(vae_local), which is the one it was trained with; drop --vae_ckpt')


def _trainer_build_kwargs(path: str, a: Mapping) -> Dict:
    need = ('patch_nums', 'vocab_size', 'z_channels', 'vae_ch', 'share_quant_resi', 'num_classes', 'depth', 'saln', 'anorm')
    missing = [k for k in need if k not in a]
    if missing:
        raise UserError(f'{path}: its args lack {", ".join(missing)}, which define the model; it was not written by this '
                        f'project\'s train.py (resume it with train.py first, which infers and records them)')
    return dict(patch_nums=tuple(a['patch_nums']), V=a['vocab_size'], Cvae=a['z_channels'], ch=a['vae_ch'],
                share_quant_resi=a['share_quant_resi'], num_classes=a['num_classes'], depth=a['depth'], shared_aln=a['saln'],
                attn_l2_norm=a['anorm'])


def read_weights(flags: ModelFlags, given: Collection[str] = ()) -> SamplingWeights:
    """Read the weight files (no model is built): build arguments, state dicts and their source.

    flags.var_ckpt: a train.py checkpoint (ar-ckpt-*.pth: its args define the model, its `vae_local` the
    tokenizer, --ema picks `var_ema`), a plain VAR state dict (built from the flags), or '' for the
    published var_d{depth}.pth (local file of that name, else downloaded from FoundationVision/var).
    given: the flags named on the command line; those that define the model must agree with a train.py checkpoint.
    """
    var_ckpt, vae_ckpt, depth, ema = flags.var_ckpt, flags.vae_ckpt, flags.depth, flags.ema
    trainer_ckpt = None
    if var_ckpt:
        if not os.path.isfile(var_ckpt):
            hint = (f'; for the published {os.path.basename(var_ckpt)} leave --var_ckpt empty and pass --depth'
                    if os.path.basename(var_ckpt) in PUBLISHED else '')
            raise UserError(f'--var_ckpt={var_ckpt}: no such file{hint}')
        obj = _load(var_ckpt)
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
        if is_reference_ckpt(trainer_ckpt):   # written by the reference's train.py: its args lack the model's shape
            for note in complete_reference_args(trainer_ckpt):
                logger.info('%s: a checkpoint of the reference trainer; inferred %s', var_ckpt, note)
        a = trainer_ckpt.get('args') or {}
        _check_flags_against_trainer_args(var_ckpt, a, flags, given)
        kw = _trainer_build_kwargs(var_ckpt, a)
        if ema and 'var_ema' not in trainer_ckpt['trainer']:
            raise UserError(f'--ema: {var_ckpt} has no EMA weights (it was trained without --ema)')
        var_state = trainer_ckpt['trainer']['var_ema' if ema else 'var_wo_ddp']
        vae_state = trainer_ckpt['trainer']['vae_local']
        source = (f'{var_ckpt} ({"EMA" if ema else "trained"} weights, epoch {trainer_ckpt.get("epoch")}, '
                  f'iteration {trainer_ckpt.get("iter")})')
        vae_source = f'{var_ckpt} (vae_local)'
    else:
        published = published_build_kwargs(f'var_d{depth}.pth') if f'var_d{depth}.pth' in PUBLISHED and not var_ckpt else {}
        patch_nums = parse_patch_nums(flags.pn) if flags.pn else published.get('patch_nums', PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256)
        emb = var_state.get('class_emb.weight') if isinstance(var_state, Mapping) else None
        num_classes = emb.shape[0] - 1 if isinstance(emb, torch.Tensor) and emb.ndim == 2 else flags.num_classes   # its last row: no class
        kw = dict(patch_nums=tuple(patch_nums), V=flags.vocab_size, Cvae=flags.z_channels, ch=flags.vae_ch,
                  share_quant_resi=flags.share_quant_resi, num_classes=num_classes, depth=depth,
                  shared_aln=published.get('shared_aln', depth == 36) if flags.saln is None else flags.saln, attn_l2_norm=flags.anorm)
        vae_state = _vae_state(_load(resolve_checkpoint(vae_ckpt)))
        source, vae_source = var_ckpt or f'var_d{depth}.pth', vae_ckpt
    return SamplingWeights(kw=kw, var_state=var_state, vae_state=vae_state, source=source, vae_source=vae_source)


def build_from_weights(device: torch.device, flags: ModelFlags, w: SamplingWeights) -> Tuple[VQVAE, VAR]:
    """(tokenizer, VAR) built from `w.kw`, the state dicts loaded strictly, in eval mode on `device`."""
    vae, var = build_vae_var(device=device, flash_if_available=flags.fuse, fused_if_available=flags.fuse, **w.kw)
    vae.load_state_dict(w.vae_state, strict=True)
    var.load_state_dict(w.var_state, strict=True)
    vae.eval()
    var.eval()
    logger.info('VAR d%d from %s; %d classes, scales %s', w.kw['depth'], w.source, w.kw['num_classes'], w.kw['patch_nums'])
    return vae, var


def load_for_sampling(device: torch.device, flags: ModelFlags, given: Collection[str] = ()) -> Tuple[VQVAE, VAR, Dict]:
    """(tokenizer, VAR, build arguments), both in eval mode on `device` (read_weights, then build_from_weights)."""
    w = read_weights(flags, given)
    vae, var = build_from_weights(device, flags, w)
    return vae, var, w.kw


def state_fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state dict: every entry's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for k, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f'{k}\0{str(t.dtype)}\0{tuple(t.shape)}\0'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()
