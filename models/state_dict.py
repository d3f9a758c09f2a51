"""Readable checks of a state dict against a model, and recognition of the published VAR checkpoints."""
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .config import PUBLISHED, published_build_kwargs, published_configs, var_build_args, vqvae_build_args
from .errors import ModelInputError

__all__ = ['CheckpointMismatchError', 'check_state_dict']


class CheckpointMismatchError(ModelInputError, RuntimeError):
    """A state dict whose keys or shapes do not fit the model; the message lists every difference."""


def _shapes(sd: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _published_shapes(filename: str, model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """The state-dict shapes of a published file, built on the meta device with the classes of `model` (a VAR's
    tokenizer class is that of its own tokenizer)."""
    vqvae, var = published_configs(filename)
    with torch.device('meta'):
        if PUBLISHED[filename].kind == 'vae':
            return _shapes(type(model)(**vqvae_build_args(vqvae)).state_dict())
        vae = type(model.vae_proxy[0])(**vqvae_build_args(vqvae))
        return _shapes(type(model)(vae_local=vae, **var_build_args(var)).state_dict())


def _which_published(given: Dict[str, Tuple[int, ...]], kind: str, model: nn.Module) -> Optional[str]:
    for filename, published in PUBLISHED.items():
        if published.kind != kind:
            continue
        want = _published_shapes(filename, model)
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
        match = _which_published(given, kind, model)
        if match is not None:
            kw = published_build_kwargs(match)
            args = ', '.join(f'{k}={v}' for k, v in kw.items())
            hint = f'these keys and shapes are those of the published {match}: build with build_vae_var({args})'
    if hint:
        parts.append(f'  hint: {hint}')
    raise CheckpointMismatchError('\n'.join(parts))
