"""train.py --init_from: start a run from other weights, the weights only (the optimizer, the schedule and the epoch
counter start afresh): the published ones, a save_pretrained folder or Hub repo, a VAR state dict, a train.py checkpoint.

The rules, in the order train.py applies them:
- a resumable checkpoint in the output folder wins over --init_from: a killed fine-tuning run goes on where it stopped,
  and the model's shape flags not given on the command line are that checkpoint's (the source is not read again);
- the weights define the model: a shape flag given on the command line (SHAPE_FLAGS) must agree with them, one not given
  takes their value (so `--init_from=var_d16.pth` alone builds a d16);
- the tokenizer comes from the same source (a train.py checkpoint's vae_local, a save_pretrained folder's vae/, the
  published vae_ch160v4096z32.pth beside a published VAR) unless --vae_ckpt is given; a VAR state dict brings none;
- a train.py checkpoint gives its EMA weights when it has them (trained with --ema), else its trained weights;
- everything loads strictly but the class embedding, whose rows follow the classes (class_embedding_rows).

Letters: K classes of the source, N classes of the new run, C width.
"""
import logging
import os.path as osp
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

import dist
from models import build_var, build_vqvae
from models.config import (HF_REPO, PUBLISHED, PUBLISHED_DEPTHS, PUBLISHED_VAE, VARConfig, VQVAEConfig, published_configs,
                           published_var_file)
from models.hub import resolve_checkpoint
from models.pretrained import looks_like_repo_id, saved_var_files
from models.weights import SAFETENSORS_SUFFIX, load_weights
from utils.arg_util import (FlagError, check_train_flags, derive_scales, flags_from_var_config, flags_from_vqvae_config, pn_flag,
                            var_config_from_flags, vqvae_config_from_flags)
from utils.ckpt import verify_checksum
from utils.class_names import class_name_key, class_names_for
from utils.reference_ckpt import complete_reference_args, is_reference_ckpt
from utils.weights import load_tokenizer_state

__all__ = ['SHAPE_FLAGS', 'InitSource', 'start_from', 'read_source', 'take_shape', 'class_embedding_rows', 'load_source_weights']

logger = logging.getLogger('train')

# the flags that shape the model and its tokenizer (--num_classes is the new run's own: the class embedding follows it)
SHAPE_FLAGS = ('depth', 'saln', 'anorm', 'pn', 'vocab_size', 'z_channels', 'vae_ch', 'share_quant_resi')
_TOKENIZER_ONLY = ('vae_ch', 'share_quant_resi')   # not fixed by the VAR's weights: --vae_ckpt's tokenizer may differ there
_PLAIN_TOKENIZER = VQVAEConfig()                   # train.py builds its tokenizer with this quant_resi and using_znorm


@dataclass
class InitSource:
    """What --init_from gives before any model is built; var_state and vae_state are read by start_from after the flags
    are checked (a published file is downloaded only then)."""
    spec: str                                   # --init_from as given
    what: str                                   # where the weights come from, for the log
    shape: Dict[str, Any]                       # flag name → the value the weights fix (pn: sides joined by '_')
    num_classes: int                            # K
    class_names: Optional[List[str]]            # the source's class names (id = position), None when it records none
    read_var: Callable[[], Mapping[str, torch.Tensor]]
    read_vae: Optional[Callable[[], Tuple[Mapping[str, torch.Tensor], str]]]   # (state, source); None: no tokenizer of its own
    scales: Optional[Tuple[int, int]] = None    # a state dict without recorded scales: (number of scales, tokens of all scales)
    var_state: Optional[Mapping[str, torch.Tensor]] = None
    vae_state: Optional[Mapping[str, torch.Tensor]] = None
    vae_what: str = ''


def _shape_of(vqvae: VQVAEConfig, var: VARConfig, origin: str) -> Dict[str, Any]:
    if (vqvae.quant_resi, vqvae.using_znorm) != (_PLAIN_TOKENIZER.quant_resi, _PLAIN_TOKENIZER.using_znorm):
        raise FlagError(f'--init_from={origin}: its tokenizer has quant_resi={vqvae.quant_resi}, using_znorm={vqvae.using_znorm}; '
                        f'train.py builds quant_resi={_PLAIN_TOKENIZER.quant_resi}, using_znorm={_PLAIN_TOKENIZER.using_znorm}')
    both = {**flags_from_vqvae_config(vqvae), **flags_from_var_config(var)}
    return {k: both[k] for k in SHAPE_FLAGS}


def _on_local_master_first(fn: Callable[[], Any]) -> Any:
    """fn() (a download into a cache shared by the processes of a machine) on the local master, then on the others."""
    if dist.is_local_master():
        out = fn()
    dist.barrier()
    if not dist.is_local_master():
        out = fn()
    return out


def _read_file(path: str, spec: str):
    """The object in a weights or checkpoint file (memory-mapped where the format allows: a checkpoint holds the optimizer too)."""
    try:
        if str(path).endswith(SAFETENSORS_SUFFIX):
            return load_weights(path)
        return torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # not a torch file, truncated, or pickled code that weights_only refuses
        first = str(e).splitlines()[0][:200] if str(e) else ''
        raise FlagError(f'--init_from={spec}: {path} cannot be read as weights ({type(e).__name__}: {first})') from None


# ------------------------------------------------------------------ the kinds of source
def _published(spec: str, name: str, local: Optional[str]) -> InitSource:
    """var_d{depth}.pth: the shape from its name (no file read before the flags are checked), the ImageNet classes, and the
    tokenizer beside a local copy (else vae_ch160v4096z32.pth by name: a local file of that name, else the Hub)."""
    vqvae, var = published_configs(name)
    where = local or name
    vae_beside = osp.join(osp.dirname(local), PUBLISHED_VAE) if local else ''
    vae_name = vae_beside if vae_beside and osp.isfile(vae_beside) else PUBLISHED_VAE

    def read_var():
        path = _on_local_master_first(lambda: resolve_checkpoint(where))
        return load_weights(path)
    return InitSource(spec=spec, what=f'the published {name} ({where})', shape=_shape_of(vqvae, var, spec), num_classes=var.num_classes,
                      class_names=class_names_for(name, var.num_classes), read_var=read_var,
                      read_vae=lambda: load_tokenizer_state(vae_name))


def _saved_folder(spec: str) -> InitSource:
    """A folder written by save_pretrained (train.py --save_pretrained), or a Hub repo pushed by this project."""
    vqvae, var, vae_file, var_file = _on_local_master_first(lambda: saved_var_files(spec))
    where = 'folder' if osp.isdir(spec) else 'Hugging Face repo'
    return InitSource(spec=spec, what=f'{spec} (save_pretrained {where})', shape=_shape_of(vqvae, var, spec), num_classes=var.num_classes,
                      class_names=class_names_for(spec, var.num_classes), read_var=lambda: load_weights(var_file),
                      read_vae=lambda: (load_weights(vae_file), f'{spec}/vae ({where})'))


def _trainer_ckpt(spec: str, ckpt: Dict) -> InitSource:
    """A train.py checkpoint (this project's or the reference's): its EMA weights when it has them, else its trained ones."""
    from utils.model_loading import checkpoint_configs   # late: it imports the models' loading code of sample.py
    verify_checksum(ckpt, spec)
    if is_reference_ckpt(ckpt):   # its args lack the model's shape: read off the weights
        notes = complete_reference_args(ckpt)
        logger.info('--init_from=%s: a checkpoint of the reference\'s train.py; inferred %s', spec, '; '.join(notes))
    vqvae, var = checkpoint_configs(spec, ckpt)
    trainer = ckpt['trainer']
    key = 'var_ema' if 'var_ema' in trainer else 'var_wo_ddp'
    kind = 'EMA weights (var_ema)' if key == 'var_ema' else 'trained weights (var_wo_ddp; it has no EMA weights)'
    what = f'{spec} (a train.py checkpoint at epoch {ckpt.get("epoch")}, iteration {ckpt.get("iter")}: its {kind})'
    read_vae = (lambda: (trainer['vae_local'], f'{spec} (vae_local)')) if 'vae_local' in trainer else None
    return InitSource(spec=spec, what=what, shape=_shape_of(vqvae, var, spec), num_classes=var.num_classes,
                      class_names=class_names_for(ckpt, var.num_classes),
                      read_var=lambda: trainer[key], read_vae=read_vae)


def _depth_of(sd: Mapping[str, torch.Tensor]) -> int:
    return len({m.group(1) for k in sd for m in [re.match(r'blocks\.(\d+)\.', k)] if m})


def _state_dict(spec: str, sd: Mapping[str, torch.Tensor]) -> InitSource:
    """A plain VAR state dict (the published key layout) under another name: its shape read off the tensors; it records neither
    its scales (--pn must fit its number of scales and tokens) nor a tokenizer (--vae_ckpt) nor class names."""
    need = ('class_emb.weight', 'head.weight', 'word_embed.weight', 'lvl_embed.weight', 'pos_1LC')
    missing = [k for k in need if not isinstance(sd.get(k), torch.Tensor)]
    if missing:
        raise FlagError(f'--init_from={spec}: neither a train.py checkpoint nor a VAR state dict (no {", ".join(missing)})')
    depth, width = _depth_of(sd), sd['class_emb.weight'].shape[1]
    if width != 64 * depth:
        raise FlagError(f'--init_from={spec}: a VAR of width {width} and depth {depth}; train.py builds width 64 x depth')
    shape = dict(depth=depth, saln=any(k.startswith('shared_ada_lin.') for k in sd), anorm='blocks.0.attn.scale_mul_1H11' in sd,
                 vocab_size=sd['head.weight'].shape[0], z_channels=sd['word_embed.weight'].shape[1])
    return InitSource(spec=spec, what=f'{spec} (a VAR state dict)', shape=shape, num_classes=sd['class_emb.weight'].shape[0] - 1,
                      class_names=None, read_var=lambda: sd, read_vae=None,
                      scales=(sd['lvl_embed.weight'].shape[0], sd['pos_1LC'].shape[1]))


def read_source(spec: str) -> InitSource:
    """The source --init_from names: a published depth (16) or file name (var_d16.pth; a local file first, else the Hub), a
    save_pretrained folder or Hub repo id, a train.py checkpoint (ar-ckpt-*.pth) or a VAR state dict (.pth, .safetensors)."""
    published = {published_var_file(d) for d in PUBLISHED_DEPTHS}
    if re.fullmatch(r'd?\d+', spec) and not osp.exists(spec):
        name = published_var_file(spec.lstrip('d'))
        if name not in published:
            raise FlagError(f'--init_from={spec}: there is no published VAR of depth {spec.lstrip("d")} '
                            f'(the published depths are {", ".join(map(str, PUBLISHED_DEPTHS))})')
        return _published(spec, name, osp.abspath(name) if osp.isfile(name) else None)
    if spec.endswith('.dcp') and osp.isdir(spec):
        raise FlagError(f'--init_from={spec}: a sharded checkpoint of a --fsdp=1 run; write it as one file with '
                        f'`python tools/consolidate_ckpt.py {spec}` and pass the .pth')
    if osp.isdir(spec) or looks_like_repo_id(spec):
        return _saved_folder(spec)
    if osp.basename(spec) in PUBLISHED and PUBLISHED[osp.basename(spec)].kind == 'vae':
        raise FlagError(f'--init_from={spec}: the published tokenizer, not a VAR; the tokenizer is --vae_ckpt')
    if osp.isfile(spec):
        if osp.basename(spec) in published:
            return _published(spec, osp.basename(spec), osp.abspath(spec))
        obj = _read_file(spec, spec)
        if isinstance(obj, dict) and isinstance(obj.get('trainer'), dict) and 'var_wo_ddp' in obj['trainer']:
            return _trainer_ckpt(spec, obj)
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _state_dict(spec, obj)
        raise FlagError(f'--init_from={spec}: neither a train.py checkpoint nor a VAR state dict')
    if spec in published:
        return _published(spec, spec, None)
    raise FlagError(f'--init_from={spec}: no such file or folder; give a published depth or file name (16, var_d16.pth; '
                    f'from {HF_REPO} when not here), a save_pretrained folder or Hub repo id, a train.py checkpoint or a VAR state dict')


# ------------------------------------------------------------------ the model's shape flags
def _arg_value(args, flag: str):
    return pn_flag(args.patch_nums) if flag == 'pn' else getattr(args, flag)


def take_shape(args, shape: Mapping[str, Any], given: Collection[str], origin: str, check_given: bool = True) -> List[str]:
    """Set the shape flags not on the command line to the weights' values; with check_given, a given one that disagrees is an
    error naming both values. Returns 'flag=value' of the flags that changed."""
    diffs, taken = [], []
    for flag, theirs in shape.items():
        mine = _arg_value(args, flag)
        if mine == theirs:
            continue
        if flag in given:
            if check_given:
                diffs.append(f'--{flag}={mine} (the weights: {theirs})')
            continue
        setattr(args, flag, theirs)
        taken.append(f'{flag}={theirs}')
    if diffs:
        raise FlagError(f'--init_from={origin}: these flags disagree with its weights: {"; ".join(diffs)}. Drop them (the weights\' '
                        f'values are taken), or start from other weights')
    if any(t.startswith('pn=') for t in taken):   # the derived scales, resolutions and the progressive stages follow --pn
        derive_scales(args)
        check_train_flags(args)
    return taken


def _check_scales(args, src: InitSource) -> None:
    n, L = src.scales
    mine = sum(p * p for p in args.patch_nums)
    if (len(args.patch_nums), mine) != (n, L):
        raise FlagError(f'--pn={pn_flag(args.patch_nums)} ({len(args.patch_nums)} scales, {mine} tokens) does not fit --init_from='
                        f'{src.spec} ({n} scales, {L} tokens; a state dict records no scales): pass the --pn it was trained with')


def _describe_resume(args, saved: Mapping) -> str:
    started = saved.get('init_from') or ''
    if started == args.init_from:
        return f'--init_from={args.init_from} is not read again'
    return (f'--init_from={args.init_from} is not read; that run started from ' + (f'--init_from={started}' if started else 'scratch'))


def start_from(args, ckpt: Optional[Mapping], given: Collection[str], out_dir: str) -> Optional[InitSource]:
    """train.py's --init_from, after resume(): None when it has none or a resumable checkpoint wins (then the shape flags not
    given are that checkpoint's); otherwise the source, with its weights read once the flags are checked."""
    if ckpt is not None:
        saved = ckpt['args']
        if not (args.init_from or saved.get('init_from')):
            return None
        saved_shape = {f: saved[f] for f in SHAPE_FLAGS if f in saved and f != 'pn'}
        if saved.get('patch_nums'):
            saved_shape['pn'] = pn_flag(saved['patch_nums'])
        take_shape(args, saved_shape, given, out_dir, check_given=False)   # a given one that differs: check_resume_config says so
        if args.init_from:
            logger.info('the resumable checkpoint in %s wins over --init_from, so that a killed fine-tuning run goes on where it '
                        'stopped: %s', out_dir, _describe_resume(args, saved))
        args.init_from = saved.get('init_from') or ''   # the checkpoints record where the run started
        return None
    if not args.init_from:
        return None
    src = read_source(args.init_from)
    if 'vae_ckpt' in given:   # --vae_ckpt's tokenizer: only the vocabulary and latent width must fit the VAR
        src.shape = {k: v for k, v in src.shape.items() if k not in _TOKENIZER_ONLY}
        src.read_vae = None
    taken = take_shape(args, src.shape, given, args.init_from)
    if src.scales is not None:
        _check_scales(args, src)
    logger.info('--init_from: the weights of %s; the model\'s shape is theirs%s', src.what,
                f' (flags not given, taken from them: {", ".join(taken)})' if taken else '')
    vae_meta, var_meta = _meta_models(args, src.num_classes)
    src.var_state = src.read_var()
    _check_fits(var_meta, src.var_state, src.what, src.spec)
    if src.read_vae is not None:
        src.vae_state, src.vae_what = src.read_vae()
        _check_fits(vae_meta, src.vae_state, f'its tokenizer {src.vae_what}', src.spec)
    return src


def _meta_models(args, num_classes: int):
    """The tokenizer and VAR of the flags with the source's class count, on the meta device: their keys and shapes, no memory."""
    vae = build_vqvae(vqvae_config_from_flags(args), 'meta')
    var = build_var(var_config_from_flags({**args.state_dict(), 'num_classes': num_classes}), vae, 'meta', flash_if_available=False,
                    fused_if_available=False)   # --num_classes may still be 0 (the data's count, read later)
    return vae, var


# ------------------------------------------------------------------ the weights
def _keys_of(names: Optional[Sequence[str]], n: int) -> Optional[List[str]]:
    return [class_name_key(x) for x in names[:n]] if names else None


def class_embedding_rows(src_emb: torch.Tensor, fresh_emb: torch.Tensor, src_names: Optional[Sequence[str]],
                         new_names: Optional[Sequence[str]]) -> Tuple[torch.Tensor, str]:
    """The class embedding of the new run ((N+1, C): N classes, then the null class) from the source's ((K+1, C)), and the one
    log line that says what was re-initialised and why ('' when the source's is taken as it is).

    - both sides name their classes and the names differ, with some in common: the rows of the classes in both are carried
      over by name, the others keep fresh_emb's rows (a fresh model's, VAR's init);
    - otherwise, the same class count: the source's rows as they are, by id;
    - otherwise every class row is fresh.
    The null-class row (the last) is always the source's: it is the condition "no class" (condition dropout, classifier-free
    guidance), learned from every image whatever its class, so it carries over to other classes.
    """
    K, N = src_emb.shape[0] - 1, fresh_emb.shape[0] - 1
    src_keys = _keys_of(src_names, K)   # a model may name only its first classes
    new_keys = _keys_of(new_names, N)
    index = {}
    for i, key in enumerate(src_keys or ()):
        index.setdefault(key, i)
    matches = [(j, index[key]) for j, key in enumerate(new_keys or ()) if key in index]
    as_is = K == N and (not matches or (len(matches) == N and all(i == j for j, i in matches)))
    if src_keys and new_keys and matches and not as_is:
        out = fresh_emb.clone()
        for j, i in matches:
            out[j] = src_emb[i]
        examples = ', '.join(new_names[j] for j, _ in matches[:3]) + (', ...' if len(matches) > 3 else '')
        why = (f'{len(matches)} of the {N} classes carried over by name from the {K} of the weights ({examples}), '
               f'{N - len(matches)} re-initialised as a fresh model\'s (VAR\'s init)')
    elif K == N:
        if src_keys and new_keys and not matches:
            return src_emb, (f'class embedding: the {N} classes taken by id, as no class name of the data is one of the '
                             f'weights\' ({new_names[0]!r} vs {src_names[0]!r}, ...)')
        return src_emb, ''
    else:
        out = fresh_emb.clone()
        reason = ('no class name in common' if src_keys and new_keys else
                  'the weights record no class names' if not src_keys else 'the data names no class')
        why = f'the {N} class rows re-initialised as a fresh model\'s (VAR\'s init): the weights have {K} classes and {reason}'
    out[N] = src_emb[K]
    return out, f'class embedding: {why}; the null-class row copied (the condition "no class" of classifier-free guidance)'


def _check_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, spec: str) -> None:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    diffs = [f'{k} missing' for k in own if k not in state] + [f'{k} unexpected' for k in state if k not in own]
    diffs += [f'{k}: {list(state[k].shape)} vs {list(own[k])}' for k in own if k in state and tuple(state[k].shape) != own[k]]
    if diffs:
        raise FlagError(f'--init_from={spec}: {what} does not fit the {type(model).__name__} of its shape ({len(diffs)} '
                        f'differences: {"; ".join(diffs[:3])}{"; ..." if len(diffs) > 3 else ""}): is it the file you meant?')


@torch.no_grad()
def load_source_weights(src: InitSource, vae: torch.nn.Module, var: torch.nn.Module, class_names: Optional[Sequence[str]]) -> None:
    """Load the source's VAR weights into the freshly built `var` (strictly; the class embedding by class_embedding_rows) and its
    tokenizer into `vae` when it brings one (else train.py loads --vae_ckpt); one log line when the class rows are not the source's."""
    state = dict(src.var_state)
    if 'class_emb.weight' in state:
        state['class_emb.weight'], note = class_embedding_rows(state['class_emb.weight'].to(var.class_emb.weight),
                                                               var.class_emb.weight.detach(), src.class_names, class_names)
        if note:
            logger.info('--init_from: %s', note)
    var.load_state_dict(state, strict=True)   # start_from checked the keys and shapes
    if src.vae_state is not None:
        vae.load_state_dict(src.vae_state, strict=True)
