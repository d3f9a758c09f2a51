"""Readable checks of a state dict against a model, and recognition of the published VAR checkpoints."""
import dataclasses
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .config import PATCH_NUMS_256, PATCH_NUMS_512, PUBLISHED_DEPTHS, VARConfig, VQVAEConfig, vae_var_kwargs

__all__ = ['CheckpointMismatchError', 'check_state_dict', 'PUBLISHED', 'PATCH_NUMS_256', 'PATCH_NUMS_512', 'published_build_kwargs',
           'published_configs']

# file name in the Hugging Face repo FoundationVision/var → (kind, the build_vae_var arguments that differ between the files)
_TOKENIZER = VQVAEConfig()
PUBLISHED: Dict[str, Tuple[str, dict]] = {
    'vae_ch160v4096z32.pth': ('vae', dict(V=_TOKENIZER.V, Cvae=_TOKENIZER.Cvae, ch=_TOKENIZER.ch, share_quant_resi=_TOKENIZER.share_quant_resi)),
    **{f'var_d{d}.pth': ('var', dict(depth=c.depth, shared_aln=c.shared_aln, patch_nums=c.patch_nums))
       for d in PUBLISHED_DEPTHS for c in [VARConfig.published(d)]},
}


def published_configs(filename: str) -> Tuple[VQVAEConfig, VARConfig]:
    """(tokenizer, VAR) configs of a published file; the tokenizer file goes with the 256 px d16."""
    kind, kw = PUBLISHED[filename]
    var = VARConfig.published(kw['depth'] if kind == 'var' else 16)
    return dataclasses.replace(_TOKENIZER, patch_nums=var.patch_nums), var


def published_build_kwargs(filename: str) -> dict:
    """build_vae_var arguments (besides device) of a published file, tokenizer and 1000 classes included."""
    return vae_var_kwargs(*published_configs(filename))


class CheckpointMismatchError(RuntimeError):
    """A state dict whose keys or shapes do not fit the model; the message lists every difference."""


def _shapes(sd: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _published_shapes(filename: str) -> Dict[str, Tuple[int, ...]]:
    from . import build_vae_var  # late import: the builder imports this module
    kind, _ = PUBLISHED[filename]
    vae, var = build_vae_var(device='meta', **published_build_kwargs(filename))
    return _shapes((vae if kind == 'vae' else var).state_dict())


def _which_published(given: Dict[str, Tuple[int, ...]], kind: str) -> Optional[str]:
    for filename, (k, _) in PUBLISHED.items():
        if k != kind:
            continue
        want = _published_shapes(filename)
        if kind == 'vae':  # the usage statistics depend on the number of scales only
            want.pop('quantize.ema_vocab_hit_SV', None)
            given = {k: v for k, v in given.items() if k != 'quantize.ema_vocab_hit_SV'}
        if want == given:
            return filename
    return None


def _wrapper_hint(sd: Mapping) -> str:
    keys = list(sd.keys())
    if not keys:
        return 'the state dict is empty'
    if any(k in sd for k in ('trainer', 'epoch', 'iter', 'args')) and 'trainer' in sd:
        return ("this is a trainer checkpoint (ar-ckpt-*.pth): load ckpt['trainer']['var_wo_ddp'] into the VAR "
                "and ckpt['trainer']['vae_local'] into the VQVAE")
    if all(isinstance(k, str) and k.startswith('module.') for k in keys):
        return "every key starts with 'module.' (saved from a DistributedDataParallel wrapper): strip that prefix first"
    if all(isinstance(k, str) and k.startswith('_orig_mod.') for k in keys):
        return "every key starts with '_orig_mod.' (saved from torch.compile): strip that prefix first"
    return ''


def check_state_dict(model: nn.Module, state_dict: Mapping, kind: str, max_listed: int = 20) -> None:
    """Raise CheckpointMismatchError naming missing, unexpected and wrongly shaped keys, if any."""
    own = _shapes(model.state_dict())
    given = _shapes(state_dict)
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in given and given[k] != own[k]]
    if not (missing or unexpected or wrong):
        return

    def listing(title, keys, fmt):
        shown = [fmt(k) for k in keys[:max_listed]]
        more = f'\n    ... and {len(keys) - max_listed} more' if len(keys) > max_listed else ''
        return f'  {title} ({len(keys)}):\n' + '\n'.join(f'    {s}' for s in shown) + more

    parts = [f'the checkpoint does not fit this {type(model).__name__}:']
    if missing:
        parts.append(listing('missing keys', missing, lambda k: f'{k} (model: {list(own[k])})'))
    if unexpected:
        parts.append(listing('unexpected keys', unexpected, lambda k: f'{k} (checkpoint: {list(given[k]) if k in given else type(state_dict[k]).__name__})'))
    if wrong:
        parts.append(listing('wrong shapes', wrong, lambda k: f'{k}: checkpoint {list(given[k])}, model {list(own[k])}'))
    hint = _wrapper_hint(state_dict)
    if not hint:
        match = _which_published(given, kind)
        if match is not None:
            kw = published_build_kwargs(match)
            args = ', '.join(f'{k}={v}' for k, v in kw.items())
            hint = f'these keys and shapes are those of the published {match}: build with build_vae_var({args})'
    if hint:
        parts.append(f'  hint: {hint}')
    raise CheckpointMismatchError('\n'.join(parts))
