"""Build the tokenizer and VAR for sampling from a trainer checkpoint, plain state dicts, or the published files."""
import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from models import VAR, VQVAE, build_var, build_vqvae
from models.config import (PUBLISHED, PUBLISHED_DEPTHS, ConfigError, VARConfig, VQVAEConfig, configs_from_dict, published_var_file,
                           vae_var_kwargs)
from models.hub import CheckpointUnavailableError, resolve_checkpoint
from models.pretrained import looks_like_repo_id, saved_var_files
from models.weights import load_weights
from utils.arg_util import (VAR_FLAGS, VQVAE_FLAGS, FlagError, ModelFlags, flags_from_var_config, flags_from_vqvae_config,
                            var_config_from_flags, vqvae_config_from_flags)
from utils.class_names import class_names_for
from utils.cli import UserError
from utils.weights import load_tokenizer_state
from utils.reference_ckpt import complete_reference_args, is_reference_ckpt

__all__ = ['SamplingWeights', 'given_flags', 'checkpoint_configs', 'read_weights', 'build_from_weights', 'load_for_sampling',
           'state_fingerprint']

logger = logging.getLogger(__name__)

@dataclass
class SamplingWeights:
    """What the weight files say, before any model is built."""
    vqvae: VQVAEConfig
    var: VARConfig
    var_state: Mapping[str, torch.Tensor]
    vae_state: Mapping[str, torch.Tensor]
    source: str          # where the VAR weights come from, for the log
    vae_source: str      # where the tokenizer's come from
    class_names: Optional[List[str]] = None   # the VAR's class names (id = position; utils.class_names.class_names_for)

    @property
    def kw(self) -> Dict:
        """The build_vae_var arguments (besides device and kernels) of the two configs."""
        return vae_var_kwargs(self.vqvae, self.var)


def given_flags(argv: Sequence[str]) -> Tuple[str, ...]:
    """Names of the flags on a command line (`--name=value`, `--name value` or a bare `--name`): those that define the
    model must agree with weights that carry their own configuration (read_weights' `given`)."""
    return tuple(sorted({a[2:].split('=', 1)[0] for a in argv if a.startswith('--') and len(a) > 2}))


def _check_flags_against_checkpoint(path: str, vqvae: VQVAEConfig, var: VARConfig, flags: ModelFlags, given: Collection[str],
                                    what: str = 'a train.py checkpoint', defined_by: str = 'args') -> None:
    """Model flags given on the command line must agree with the checkpoint (or save_pretrained folder), which defines
    the model (--num_classes of sample.py and edit.py is how many classes to sample, not the model's)."""
    theirs = {**flags_from_vqvae_config(vqvae), **flags_from_var_config(var)}
    model_flags = dataclasses.replace(flags, num_classes=var.num_classes)   # not compared (see above); sample.py's may be 0
    mine = {**flags_from_vqvae_config(vqvae_config_from_flags(model_flags)), **flags_from_var_config(var_config_from_flags(model_flags))}
    diffs = [f'--{flag}={getattr(flags, flag)} (the checkpoint: {theirs[flag]})'
             for flag in theirs if flag in given and flag != 'num_classes' and mine[flag] != theirs[flag]]
    if diffs:
        raise FlagError(f'{path} is {what} whose {defined_by} define the model, and these flags disagree with it: '
                        f'{"; ".join(diffs)}. Drop them (its values are used), or pass the weights you meant')
    if 'vae_ckpt' in given:
        raise FlagError(f'--vae_ckpt={flags.vae_ckpt}: {path} is {what} that carries its own tokenizer, '
                        f'which is the one it was trained with; drop --vae_ckpt')


def checkpoint_configs(path: str, ckpt: Mapping) -> Tuple[VQVAEConfig, VARConfig]:
    """(tokenizer, VAR) configs of a train.py checkpoint: its 'model_config', or in the older layout its args' model flags."""
    try:
        if 'model_config' in ckpt:
            return configs_from_dict(ckpt['model_config'])
        a = ckpt.get('args') or {}
        need = [f for f in dict.fromkeys((*VQVAE_FLAGS, *VAR_FLAGS)) if f not in ('quant_resi', 'using_znorm', 'pn')]
        missing = [k for k in need if k not in a] + ([] if 'patch_nums' in a or 'pn' in a else ['patch_nums'])
        if missing:
            raise UserError(f'{path}: its args lack {", ".join(missing)}, which define the model; it was not written by this '
                            f'project\'s train.py (resume it with train.py first, which infers and records them)')
        return vqvae_config_from_flags(a), var_config_from_flags(a)
    except (ConfigError, FlagError) as e:
        raise UserError(f'{path}: its model configuration cannot build a model: {e}') from None


def read_weights(flags: ModelFlags, given: Collection[str] = ()) -> SamplingWeights:
    """Read the weight files (no model is built): build arguments, state dicts and their source.

    flags.var_ckpt: a train.py checkpoint (ar-ckpt-*.pth: its args define the model, its `vae_local` the
    tokenizer, --ema picks `var_ema`), a folder written by save_pretrained or a Hub repo id pushed by this project (its
    config.json and vae/ define both models), a plain VAR state dict (.pth or .safetensors, built from the flags), or '' for the
    published var_d{depth}.pth (local file of that name, else downloaded from FoundationVision/var).
    given: the flags named on the command line; those that define the model must agree with a train.py checkpoint.
    The class names: a train.py checkpoint's, a folder's classes.json, ImageNet's for the published files, else None.
    """
    var_ckpt, vae_ckpt, depth, ema = flags.var_ckpt, flags.vae_ckpt, flags.depth, flags.ema
    trainer_ckpt = None
    if var_ckpt and (os.path.isdir(var_ckpt) or looks_like_repo_id(var_ckpt)):
        return _read_saved_folder(flags, given)
    if var_ckpt:
        if not os.path.isfile(var_ckpt):
            hint = (f'; for the published {os.path.basename(var_ckpt)} leave --var_ckpt empty and pass --depth'
                    if os.path.basename(var_ckpt) in PUBLISHED else '')
            raise UserError(f'--var_ckpt={var_ckpt}: no such file{hint}')
        obj = load_weights(var_ckpt)
        if isinstance(obj, dict) and isinstance(obj.get('trainer'), dict) and 'var_wo_ddp' in obj['trainer']:
            trainer_ckpt = obj
        elif ema:
            raise UserError(f'--ema picks the EMA weights of a train.py checkpoint, but {var_ckpt} is a plain state dict')
        else:
            var_state = obj
    else:
        name = published_var_file(depth)
        if name not in PUBLISHED:
            raise UserError(f'there is no published VAR of depth {depth}: use --depth {", ".join(map(str, PUBLISHED_DEPTHS[:-1]))} or '
                            f'{PUBLISHED_DEPTHS[-1]}, or --var_ckpt')
        if ema:
            raise UserError('--ema picks the EMA weights of a train.py checkpoint; the published files have none')
        var_state = load_weights(resolve_checkpoint(name))

    if trainer_ckpt is not None:
        if is_reference_ckpt(trainer_ckpt):   # written by the reference's train.py: its args lack the model's shape
            for note in complete_reference_args(trainer_ckpt):
                logger.info('%s: a checkpoint of the reference trainer; inferred %s', var_ckpt, note)
        vqvae_cfg, var_cfg = checkpoint_configs(var_ckpt, trainer_ckpt)
        _check_flags_against_checkpoint(var_ckpt, vqvae_cfg, var_cfg, flags, given)
        if ema and 'var_ema' not in trainer_ckpt['trainer']:
            raise UserError(f'--ema: {var_ckpt} has no EMA weights (it was trained without --ema)')
        var_state = trainer_ckpt['trainer']['var_ema' if ema else 'var_wo_ddp']
        vae_state = trainer_ckpt['trainer']['vae_local']
        source = (f'{var_ckpt} ({"EMA" if ema else "trained"} weights, epoch {trainer_ckpt.get("epoch")}, '
                  f'iteration {trainer_ckpt.get("iter")})')
        vae_source = f'{var_ckpt} (vae_local)'
        names = class_names_for(trainer_ckpt, var_cfg.num_classes)
    else:
        emb = var_state.get('class_emb.weight') if isinstance(var_state, Mapping) else None
        num_classes = emb.shape[0] - 1 if isinstance(emb, torch.Tensor) and emb.ndim == 2 else flags.num_classes   # its last row: no class
        vqvae_cfg, var_cfg = vqvae_config_from_flags(flags), var_config_from_flags(dataclasses.replace(flags, num_classes=num_classes))
        vae_state, _ = load_tokenizer_state(vae_ckpt)
        source, vae_source = var_ckpt or published_var_file(depth), vae_ckpt
        published = os.path.basename(source) in PUBLISHED   # ImageNet's names; a plain state dict records none
        names = class_names_for(source if published else var_state, num_classes)
    return SamplingWeights(vqvae=vqvae_cfg, var=var_cfg, var_state=var_state, vae_state=vae_state, source=source, vae_source=vae_source,
                           class_names=names)


def _read_saved_folder(flags: ModelFlags, given: Collection[str]) -> SamplingWeights:
    """The weights of a folder written by save_pretrained (or train.py --save_pretrained), or of a Hub repo pushed by
    this project: its config.json and vae/config.json define the two models, vae/ holds the tokenizer."""
    var_ckpt = flags.var_ckpt
    if flags.ema:
        raise UserError(f'--ema picks the EMA weights of a train.py checkpoint; {var_ckpt} holds one set of weights '
                        f'(train.py --save_pretrained saves the EMA ones when it has them)')
    local = os.path.isdir(var_ckpt)
    try:
        vqvae_cfg, var_cfg, vae_file, var_file = saved_var_files(var_ckpt)
    except CheckpointUnavailableError as e:
        raise CheckpointUnavailableError(f'--var_ckpt={var_ckpt} is no local file or folder, so it was taken as a Hugging Face '
                                         f'repo id: {e}') from None
    where = 'folder' if local else 'Hugging Face repo'
    _check_flags_against_checkpoint(var_ckpt, vqvae_cfg, var_cfg, flags, given, defined_by='config.json and vae/config.json',
                                    what='a save_pretrained folder' if local else 'a Hugging Face repo written by save_pretrained')
    return SamplingWeights(vqvae=vqvae_cfg, var=var_cfg, var_state=load_weights(var_file), vae_state=load_weights(vae_file),
                           source=f'{var_ckpt} ({where})', vae_source=f'{var_ckpt}/vae ({where})',
                           class_names=class_names_for(var_ckpt, var_cfg.num_classes))


def build_from_weights(device: torch.device, flags: ModelFlags, w: SamplingWeights) -> Tuple[VQVAE, VAR]:
    """(tokenizer, VAR) built from the configs of `w`, the state dicts loaded strictly, in eval mode on `device`; the VAR
    carries the class names (var.class_names, which save_pretrained writes as classes.json)."""
    vae = build_vqvae(w.vqvae, device)
    var = build_var(w.var, vae, device, flash_if_available=flags.fuse, fused_if_available=flags.fuse)
    var.class_names = w.class_names
    vae.load_state_dict(w.vae_state, strict=True)
    var.load_state_dict(w.var_state, strict=True)
    vae.eval()
    var.eval()
    logger.info('VAR d%d from %s; %d classes, scales %s', w.var.depth, w.source, w.var.num_classes, w.var.patch_nums)
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
