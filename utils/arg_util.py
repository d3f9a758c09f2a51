"""Command-line flags of train.py: the reference's names, defaults and derived values, parsed strictly."""
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from models.config import (HF_REPO, PATCH_NUMS_256, PATCH_NUMS_512, PUBLISHED_DEPTHS, PUBLISHED_VAE, ConfigError, VARConfig, VQVAEConfig,
                           configs_to_dict)
from utils.cli import UserError
from utils.flags import flag, parse_dataclass, str2bool   # the one flag parser of every script, re-exported here

__all__ = ['ModelFlags', 'derive_scales', 'derive_batch', 'FlagError', 'Args', 'parse_args', 'VAEArgs', 'parse_vae_args', 'VAE_MODEL_KEYS', 'ExtractArgs', 'parse_extract_args', 'parse_dataclass', 'str2bool', 'PN_SHORTCUTS', 'parse_patch_nums', 'MODEL_KEYS',
           'VQVAE_FLAGS', 'VAR_FLAGS', 'vqvae_config_from_flags', 'flags_from_vqvae_config', 'var_config_from_flags', 'flags_from_var_config']

logger = logging.getLogger(__name__)

_DEPTHS = ', '.join(map(str, PUBLISHED_DEPTHS))   # for the help of --depth


class FlagError(UserError, ValueError):
    """A command-line flag with a value that cannot work; the message names the flag."""

def pn_flag(patch_nums: Sequence[int]) -> str:
    """The --pn value of a scale list: its sides joined by '_'."""
    return '_'.join(str(p) for p in patch_nums)


PN_SHORTCUTS = {
    '256': pn_flag(PATCH_NUMS_256),
    '512': pn_flag(PATCH_NUMS_512),
    '1024': '1_2_3_4_5_7_9_12_16_21_27_36_48_64',
}


def parse_patch_nums(pn: str) -> Tuple[int, ...]:
    pn = PN_SHORTCUTS.get(str(pn), str(pn))
    try:
        patch_nums = tuple(int(p) for p in pn.replace('-', '_').split('_'))
    except ValueError:
        raise FlagError(f'--pn={pn!r} must be 256, 512, 1024 or sides joined by "_", e.g. {PN_SHORTCUTS["256"]}') from None
    if not patch_nums or any(p < 1 for p in patch_nums) or list(patch_nums) != sorted(set(patch_nums)):
        raise FlagError(f'--pn={pn!r} must list increasing positive sides')
    return patch_nums


def derive_scales(args) -> None:
    """pn (shortcuts 256/512/1024) → patch_nums, resos and the data resolution; patch_size must be 16."""
    if args.pn in PN_SHORTCUTS:
        args.pn = PN_SHORTCUTS[args.pn]
    args.patch_nums = parse_patch_nums(args.pn)
    if args.patch_size != 16:
        raise FlagError(f'--patch_size={args.patch_size}: the tokenizer downsamples by 16, so patch_size must be 16')
    if hasattr(args, 'resos'):
        args.resos = tuple(pn * args.patch_size for pn in args.patch_nums)
    args.data_load_reso = args.patch_nums[-1] * args.patch_size


def derive_batch(args, world_size: int) -> None:
    """bs (global, per optimizer step) → per-process micro batch bs/ac/world (rounded) and the global micro batch."""
    if args.fp16 not in (0, 1, 2):
        raise FlagError(f'--fp16={args.fp16}: use 0 (float32), 1 (float16 with a loss scaler) or 2 (bfloat16)')
    if args.ac < 1 or args.bs < 1 or args.ep < 1:
        raise FlagError(f'--bs, --ac and --ep must be >= 1, got bs={args.bs} ac={args.ac} ep={args.ep}')
    args.world_size = world_size
    bs_per_proc = round(args.bs / args.ac / world_size)
    if bs_per_proc < 1:
        raise FlagError(f'--bs={args.bs} is too small for --ac={args.ac} and {world_size} processes')
    if bs_per_proc * args.ac * world_size != args.bs:
        logger.warning('--bs=%d is not a multiple of ac x processes = %d: using bs=%d', args.bs, args.ac * world_size, bs_per_proc * args.ac * world_size)
    args.batch_size = bs_per_proc
    args.glb_batch_size = bs_per_proc * world_size
    args.bs = args.glb_batch_size * args.ac


def _check(flag: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise FlagError(f'--{flag}={value}: {allowed}')


def check_loop_flags(args) -> None:
    """Ranges of the flags train.py and train_vae.py share: schedule, data loading, validation, checkpoints."""
    from utils.lr_control import check_schedule
    try:
        check_schedule(args.sche)
    except ValueError as e:
        raise FlagError(f'--sche={args.sche}: {e}') from None
    _check('workers', args.workers, args.workers >= 0, 'must be >= 0 (0: load in the main process)')
    _check('val_every_ep', args.val_every_ep, args.val_every_ep >= 1, 'must be >= 1 (validation also runs after the last epoch)')
    _check('nonfinite_patience', args.nonfinite_patience, args.nonfinite_patience >= 1, 'must be >= 1')
    _check('ckpt_every_it', args.ckpt_every_it, args.ckpt_every_it >= 0, 'must be >= 0 (0: off)')
    _check('mid_reso', args.mid_reso, args.mid_reso >= 1, 'must be >= 1 (resize to mid_reso x the final size, then crop)')
    _check('wp', args.wp, args.wp >= 0, 'must be >= 0 warm-up epochs (0: the default)')
    _check('wp0', args.wp0, 0 <= args.wp0 <= 1, 'must be in [0, 1] (the lr ratio at the start of the warm-up)')
    _check('wpe', args.wpe, args.wpe > 0 if args.sche == 'exp' else args.wpe >= 0,
           'must be > 0 with --sche=exp' if args.sche == 'exp' else 'must be >= 0 (the final lr ratio)')


def check_train_flags(args: 'Args') -> None:
    """Ranges of train.py's own flags; called before anything is read or built."""
    _check('ema', args.ema, 0 <= args.ema < 1, 'must be in [0, 1) (0: no EMA; e.g. 0.9999)')
    _check('ls', args.ls, 0 <= args.ls < 1, 'must be in [0, 1) (label smoothing; 0: off)')
    _check('pg', args.pg, 0 <= args.pg < 1, 'must be in [0, 1) (the fraction of training that is progressive; 0: off)')
    n = len(args.patch_nums)
    if args.pg > 0:   # pg0 is read only in progressive training
        _check('pg0', args.pg0, 0 <= args.pg0 < n, f'must be in [0, {n - 1}] with --pg > 0 (a stage of the {n} scales of --pn)')
    _check('pgwp', args.pgwp, args.pgwp >= 0, 'must be >= 0 epochs (0: the default ep/300)')
    _check('tblr', args.tblr, args.tblr > 0, 'must be > 0')
    _check('fixed_tlr', args.fixed_tlr, args.fixed_tlr >= 0, 'must be >= 0 (0: off, the peak lr is tblr x bs / 256)')
    _check('twd', args.twd, args.twd >= 0, 'must be >= 0')
    _check('twde', args.twde, args.twde >= 0, 'must be >= 0 (0: = twd)')
    _check('depth', args.depth, args.depth >= 1, 'must be >= 1')
    _check('num_classes', args.num_classes, args.num_classes >= 0, 'must be >= 0 (0: the number of class folders)')
    for flag in ('vfast', 'tfast'):
        v = getattr(args, flag)
        _check(flag, v, v in (0, 1, 2, 3), 'use 0 (off), 1 (reduce-overhead), 2 (max-autotune) or 3 (default)')
    if args.compile_blocks and args.tfast != 0:
        raise FlagError(f'--compile_blocks=1 cannot be combined with --tfast={args.tfast}: both compile VAR (block by block, or '
                        'the whole model); use --compile_blocks=1 --tfast=0, or --compile_blocks=0')
    for flag in ('vocab_size', 'z_channels', 'vae_ch'):
        v = getattr(args, flag)
        _check(flag, v, v >= 1, 'must be >= 1')
    _check('share_quant_resi', args.share_quant_resi, args.share_quant_resi >= 0, 'must be >= 0')
    _check('vis_every_ep', args.vis_every_ep, args.vis_every_ep >= -1, 'must be >= 1 epochs, 0 (a tenth of the run) or -1 (never)')


def check_fsdp_flags(args, supported: Dict[str, Tuple[bool, str]]) -> None:
    """--fsdp=1 with a flag value it does not support ({flag: (supported, the values to use)}) stops before anything is built."""
    _check('fsdp', args.fsdp, args.fsdp in (0, 1), 'use 0 (DDP: every process holds the whole model) or 1 (FSDP2: sharded)')
    if not args.fsdp:
        return
    for flag, (ok, use) in supported.items():
        if not ok:
            raise FlagError(f'--fsdp=1 does not support --{flag}={_flag(args, flag)}: use {use} with --fsdp=1, or --fsdp=0 (DDP)')


# ------------------------------------------------------------------ flags <-> model configs (models/config.py)
# The one translation between the CLI flag names and the configs' field names. A script that lacks one of these
# flags (--quant_resi and --using_znorm are train_vae.py's only) builds with the config's default for it.
VQVAE_FLAGS = {'vocab_size': 'V', 'z_channels': 'Cvae', 'vae_ch': 'ch', 'share_quant_resi': 'share_quant_resi',
               'quant_resi': 'quant_resi', 'using_znorm': 'using_znorm', 'pn': 'patch_nums'}
VAR_FLAGS = {'depth': 'depth', 'num_classes': 'num_classes', 'saln': 'shared_aln', 'anorm': 'attn_l2_norm', 'pn': 'patch_nums'}
_ABSENT = object()


def _flag(args, name: str):
    """A flag's value on a flags object, or in the args dict of a checkpoint; _ABSENT when it has no such flag."""
    return args.get(name, _ABSENT) if isinstance(args, Mapping) else getattr(args, name, _ABSENT)


def _published_patch_nums(args) -> Tuple[int, ...]:
    """The scales when --pn is empty (sample.py, edit.py): the published ones of --depth (512 px for d36)."""
    return PATCH_NUMS_512 if _flag(args, 'depth') == 36 else PATCH_NUMS_256


def _patch_nums(args) -> Tuple[int, ...]:
    """The scales: `patch_nums` where recorded (finalized args, a checkpoint's args), else --pn parsed, else as published."""
    recorded = _flag(args, 'patch_nums')
    if recorded not in (_ABSENT, None) and len(recorded):
        return tuple(recorded)
    pn = _flag(args, 'pn')
    return parse_patch_nums(pn) if pn not in (_ABSENT, None, '') else _published_patch_nums(args)


def _config_from_flags(base, table: Mapping[str, str], args):
    values = {}
    for flag, name in table.items():
        v = _flag(args, flag)
        if flag == 'pn':
            v = _patch_nums(args)
        if v is not _ABSENT and v is not None:   # None: as published (--saln of sample.py and edit.py)
            values[name] = v
    try:
        return dataclasses.replace(base, **values)
    except ConfigError as e:
        flag = next((f for f, field in table.items() if field == e.field), None)
        if flag is None:
            raise FlagError(str(e)) from None
        raise FlagError(f'--{flag}={_flag(args, flag)}: {e.reason}') from None


def vqvae_config_from_flags(args) -> VQVAEConfig:
    """The tokenizer of the flags (--vocab_size --z_channels --vae_ch --share_quant_resi --pn [--quant_resi --using_znorm]).

    args: a flags dataclass (or namespace), or the args dict of a checkpoint.
    """
    return _config_from_flags(VQVAEConfig(), VQVAE_FLAGS, args)


def var_config_from_flags(args) -> VARConfig:
    """The VAR of the flags (--depth --num_classes --saln --anorm --pn); --pn '' and --saln None: as published for --depth."""
    depth = _flag(args, 'depth')
    base = VARConfig.published(depth) if depth in PUBLISHED_DEPTHS else VARConfig()
    return _config_from_flags(base, VAR_FLAGS, args)


def _flags_from_config(cfg, table: Mapping[str, str]) -> Dict[str, Any]:
    return {flag: pn_flag(cfg.patch_nums) if flag == 'pn' else getattr(cfg, field) for flag, field in table.items()}


def flags_from_vqvae_config(cfg: VQVAEConfig) -> Dict[str, Any]:
    """{flag name: value} of a tokenizer config (--pn as sides joined by '_')."""
    return _flags_from_config(cfg, VQVAE_FLAGS)


def flags_from_var_config(cfg: VARConfig) -> Dict[str, Any]:
    """{flag name: value} of a VAR config (--pn as sides joined by '_')."""
    return _flags_from_config(cfg, VAR_FLAGS)


def _args_keys(table: Mapping[str, str]) -> Tuple[str, ...]:
    return tuple('patch_nums' if flag == 'pn' else flag for flag in table)   # args keep the parsed scales as patch_nums


# the flags that define the model: a checkpoint made with other values cannot be resumed
MODEL_KEYS = tuple(dict.fromkeys(_args_keys(VAR_FLAGS) + ('patch_size',)
                                  + tuple(k for k in _args_keys(VQVAE_FLAGS) if k not in ('quant_resi', 'using_znorm'))))


@dataclass
class TokenizerShape:
    """The tokenizer's build arguments, shared by every script (the published tokenizer by default)."""
    vocab_size: int = flag(4096, "the tokenizer's codebook size V, VAR's vocabulary (must fit the tokenizer's weights)", group='model')
    z_channels: int = flag(32, "the tokenizer's latent channels Cvae: the width of one codebook entry", group='model')
    vae_ch: int = flag(160, "the tokenizer's base convolution width (a multiple of 32: GroupNorm with 32 groups)", group='model')
    share_quant_resi: int = flag(4, "the tokenizer's phi convs after quantisation: 0 one per scale, 1 one for all, n >= 2 n shared "
                                    "by neighbouring scales", group='model')


@dataclass
class Args(TokenizerShape):
    data_path: str = flag('/path/to/imagenet', 'ImageNet-style folder: train/ and val/, one subfolder of images per class (not read '
                                               'with --tokens_path)', group='data')
    exp_name: str = flag('text', "a name for the run, kept in the checkpoint's args (nothing else reads it)", group='logging')
    vfast: int = flag(0, 'torch.compile the tokenizer: 0 off, 1 mode reduce-overhead, 2 max-autotune, 3 default (--fsdp=1: 0 only)',
                      group='environment')
    vae_ckpt: str = flag(PUBLISHED_VAE, "the frozen tokenizer's weights: a state dict (.pth, .safetensors) or a train_vae.py "
                                        'checkpoint; a published file name not found locally is downloaded from '
                                        f'{HF_REPO}', group='model')
    tfast: int = flag(0, 'torch.compile VAR: 0 off, 1 mode reduce-overhead, 2 max-autotune, 3 default (--fsdp=1: 0 only)',
                      group='environment')
    compile_blocks: bool = flag(False, 'torch.compile each transformer block on its own (utils/compile.py: fullgraph, static shapes, '
                                       'one graph shared by the blocks; FlexAttention on CUDA where available; the rest of the '
                                       'model and KV-cached sampling stay eager), unlike --tfast, which compiles the whole model '
                                       'with a mode: not with --tfast other than 0, nor with --fsdp=1 (untested)',
                                group='environment')
    depth: int = flag(16, f'VAR depth: depth blocks of width 64 x depth with depth heads (published: {_DEPTHS})',
                      group='model')
    num_classes: int = flag(0, "classes of VAR's class embedding; 0: the number of class folders in data_path/train (or of "
                               '--tokens_path)', group='model')
    ini: float = flag(-1, 'std of the initial Linear and Embedding weights; < 0: sqrt(1 / (3 x width))', group='model')
    hd: float = flag(0.02, "multiplier of the output head's initial weights", group='model')
    aln: float = flag(0.5, "multiplier of the AdaLN projections' initial scale and shift weights", group='model')
    alng: float = flag(1e-5, "multiplier of the AdaLN projections' initial gamma weights", group='model')
    fp16: int = flag(0, 'mixed precision: 0 float32, 1 float16 with a loss scaler, 2 bfloat16', group='optimisation')
    tblr: float = flag(1e-4, 'base learning rate (> 0): the peak lr is tblr x bs / 256', group='optimisation')
    tlr: Optional[float] = flag(None, 'ignored, as in the reference (with a warning): the peak lr is --tblr x bs / 256; to set it '
                                      'directly use --fixed_tlr', group='optimisation')
    fixed_tlr: float = flag(0, '> 0: the peak lr as given, not scaled by the batch size (--tblr is not used); 0: off',
                            group='optimisation')
    twd: float = flag(0.05, 'weight decay at the start, cosine-annealed to --twde (biases, 1-D weights and embeddings get none)',
                      group='optimisation')
    twde: float = flag(0, 'weight decay at the end of training; 0: --twd throughout', group='optimisation')
    tclip: float = flag(2., 'clip the gradient norm at this value; <= 0: no clipping', group='optimisation')
    ls: float = flag(0.0, 'label smoothing of the cross entropy, in [0, 1); 0: off', group='optimisation')
    bs: int = flag(768, 'global batch size per optimizer step, over all processes and --ac micro steps', group='optimisation')
    ac: int = flag(1, 'gradient accumulation: micro steps per optimizer step (>= 1)', group='optimisation')
    ep: int = flag(250, 'training epochs (>= 1)', group='schedule')
    wp: float = flag(0, 'epochs of linear lr warm-up from --wp0; 0: ep / 50', group='schedule')
    wp0: float = flag(0.005, 'lr ratio at the start of the warm-up, in [0, 1]', group='schedule')
    wpe: float = flag(0.01, 'lr ratio at the end of training (> 0 with --sche=exp)', group='schedule')
    sche: str = flag('lin0', 'lr schedule after the warm-up, down to --wpe: lin0 (flat for 5%, then linear), lin (flat for 15%), '
                             'lin00 (linear), linX (X a fraction in (0, 1), e.g. lin0.3), cos, exp; --pg > 0 sets lin<pg>',
                     group='schedule')
    opt: str = flag('adamw', 'optimizer: adamw (adam is its alias)', group='optimisation')
    afuse: bool = flag(True, "fused AdamW where the device has it (PyTorch's fused=True)", group='optimisation')
    ema: float = flag(0, '> 0: also keep an EMA of the weights with this decay, in [0, 1) (e.g. 0.9999), saved beside them; 0: none',
                      group='optimisation')
    grad_ckpt: bool = flag(False, 'activation checkpointing of the transformer blocks: less memory, one more forward',
                           group='optimisation')
    fsdp: int = flag(0, '0: DDP, every process holds the whole model; 1: FSDP2, weights, gradients and optimizer state sharded over '
                        'the processes (checkpoints: DCP folders)', group='distributed')
    saln: bool = flag(False, 'one AdaLN projection shared by all blocks (as in the published d36)', group='model')
    anorm: bool = flag(True, 'L2-normalised queries and keys with a learned scale (as in every published VAR)', group='model')
    fuse: bool = flag(True, "flash-attn or xformers attention and flash-attn's fused MLP on CUDA where installed; off: PyTorch's "
                            'SDPA and plain layers', group='environment')
    pn: str = flag(PN_SHORTCUTS['256'], "the scales: increasing token-map sides joined by '_', or 256, 512, 1024 for the "
                                        'standard sets', group='model')
    patch_size: int = flag(16, 'pixels per token side at the last scale: 16 (the tokenizer downsamples by 16), so the image side '
                               'is 16 x the last of --pn', group='model')
    mid_reso: float = flag(1.125, "augmentation: resize the short side to mid_reso x the image side (>= 1), then crop (train: at "
                                  'random, val: the centre)', group='data')
    hflip: bool = flag(False, "augmentation: random horizontal flips (--tokens_path: the flipped image's token maps half of the "
                              'time)', group='data')
    workers: int = flag(0, 'DataLoader worker processes per process; 0: load in the main process', group='data')
    tokens_path: str = flag('', 'train from the token maps extract_tokens.py wrote in this folder instead of images; '
                                "'': from --data_path", group='data')
    pg: float = flag(0.0, 'progressive training: > 0 grows the trained scales from --pg0 to all during this fraction of '
                          'training, in [0, 1); 0: off', group='schedule')
    pg0: int = flag(4, 'with --pg > 0: the first stage, k trains scales 0 .. k (at most the number of scales - 1)',
                    group='schedule')
    pgwp: float = flag(0, "with --pg > 0: epochs over which a new stage's tokens warm up to full loss weight; 0: ep / 300",
                       group='schedule')
    ckpt_every_min: float = flag(30, 'also write ar-ckpt-last.pth (the one before: ar-ckpt-prev.pth) every this many minutes, '
                                     'besides after every epoch; <= 0: off', group='checkpoints and resume')
    ckpt_every_it: int = flag(0, 'and every this many iterations; 0: off', group='checkpoints and resume')
    val_every_ep: int = flag(10, 'validate every this many epochs (>= 1) and after the last; ar-ckpt-best.pth has the best '
                                 'validation loss', group='evaluation')
    nonfinite_patience: int = flag(50, 'a step with a non-finite loss or gradient is skipped; stop after this many in a row (>= 1)',
                                   group='optimisation')
    local_out_dir_path: str = flag('local_output', "the run's folder: checkpoints, log.txt, tensorboard events; the same command "
                                                   'again resumes from its ar-ckpt-last.pth', group='checkpoints and resume')
    init_from: str = flag('', "start from these weights only (fresh optimizer, schedule and epoch): a published file or depth "
                              "(var_d16.pth, 16: a local file first, else the Hub), a save_pretrained folder or Hub id, a VAR state "
                              "dict, or a train.py checkpoint (its EMA weights when it has them, else its trained ones). Their shape "
                              "flags (--depth --saln --anorm --pn, the tokenizer's) are taken when not given and must agree when given; "
                              "the tokenizer comes with them unless --vae_ckpt is given; the class embedding follows the data's "
                              "classes (by name where both sides name them). A resumable checkpoint in local_out_dir_path wins; "
                              "'': from scratch", group='checkpoints and resume')
    vis_every_ep: int = flag(0, 'a tensorboard grid of samples (fixed classes and seeds; EMA weights with --ema) every this many '
                                'epochs and after the last; 0: a tenth of the run, -1: never', group='logging')
    save_pretrained: bool = flag(True, 'at the end, write the final model (EMA weights with --ema) to local_out_dir_path/pretrained: '
                                       'config.json, model.safetensors, vae/', group='checkpoints and resume')
    push_to_hub: str = flag('', 'a Hugging Face repo id: at the end, push that folder there (network and login are checked before '
                                "training); '': no push", group='checkpoints and resume')
    tf32: bool = flag(True, 'TensorFloat32 matmuls and convolutions on CUDA (off: IEEE float32)', group='environment')
    seed: Optional[int] = flag(None, 'seed of the initialisation, the augmentations and every step; None: drawn at random and '
                                     'recorded in the checkpoint, so that a resume continues the same streams', group='environment')
    same_seed_for_all_ranks: int = flag(0, "seed of the data order (every process shuffles with it and takes its slice of each "
                                           'global batch)', group='data')

    # derived; set by finalize(), not flags
    patch_nums: Tuple[int, ...] = field(default=(), metadata={'derived': True})
    resos: Tuple[int, ...] = field(default=(), metadata={'derived': True})
    data_load_reso: int = field(default=0, metadata={'derived': True})
    batch_size: int = field(default=0, metadata={'derived': True})       # per process, per micro step
    glb_batch_size: int = field(default=0, metadata={'derived': True})   # all processes, per micro step
    world_size: int = field(default=1, metadata={'derived': True})
    cmd: str = field(default='', metadata={'derived': True})

    def finalize(self, world_size: int) -> 'Args':
        """Compute the derived values (the reference's rules) for a run of world_size processes."""
        derive_scales(self)
        derive_batch(self, world_size)
        check_train_flags(self)
        check_fsdp_flags(self, {'tfast': (self.tfast == 0, '--tfast=0'), 'vfast': (self.vfast == 0, '--vfast=0'),   # compile: untested
                                'compile_blocks': (not self.compile_blocks, '--compile_blocks=0')})
        if self.opt.lower().strip() not in ('adamw', 'adam'):
            raise FlagError(f'--opt={self.opt!r}: only adamw (and its alias adam) are supported')
        scaled_tlr = self.tblr * self.bs / 256
        if self.tlr is not None and self.tlr != scaled_tlr:
            logger.warning('--tlr=%g is ignored, as in the reference: the peak lr is --tblr x bs / 256 = %g x %d / 256 = %g. '
                           'To set the peak lr directly, use --fixed_tlr=%g', self.tlr, self.tblr, self.bs, scaled_tlr, self.tlr)
        self.tlr = self.fixed_tlr or scaled_tlr
        if self.fixed_tlr:
            logger.info('--fixed_tlr=%g: the peak lr is not scaled by the batch size (--tblr is not used)', self.fixed_tlr)
        self.twde = self.twde or self.twd
        if self.wp == 0:
            self.wp = self.ep * 1 / 50
        if self.pgwp == 0:
            self.pgwp = self.ep * 1 / 300
        if self.pg > 0:
            self.sche = f'lin{self.pg:g}'
        check_loop_flags(self)
        return self

    def model_config(self) -> Dict[str, Any]:
        """What a checkpoint stores under 'model_config': the tokenizer's and the VAR's configs as dicts."""
        return configs_to_dict(vqvae_config_from_flags(self), var_config_from_flags(self))

    def state_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tb_name(self) -> str:
        return re.sub(r'[^\w\-+,.]', '_', f'tb-VARd{self.depth}__pn{self.pn}__b{self.bs}ep{self.ep}{self.sche[:4]}lr{self.tblr:g}wd{self.twd:g}')


def parse_args(argv: Optional[Sequence[str]] = None) -> Args:
    return parse_dataclass(Args, argv, description='Train VAR (torchrun or plain python).')


VAE_MODEL_KEYS = _args_keys(VQVAE_FLAGS)


@dataclass
class VAEArgs(TokenizerShape):
    """Flags of train_vae.py: the multi-scale VQVAE tokenizer, from scratch or fine-tuned."""
    data_path: str = flag('/path/to/imagenet', 'ImageNet-style folder: train/ and val/, one subfolder of images per class',
                          group='data')
    exp_name: str = flag('vae', "a name for the run, kept in the checkpoint's args (nothing else reads it)", group='logging')
    local_out_dir_path: str = flag('local_output_vae', "the run's folder: checkpoints, vae.safetensors, log.txt, tensorboard events; "
                                                       'the same command again resumes from its vae-ckpt-last.pth',
                                   group='checkpoints and resume')
    vae_ckpt: str = flag('', 'weights to fine-tune (or, with --eval_only, to evaluate): a state dict (.pth, .safetensors) or a '
                             "train_vae.py checkpoint; a published file name not found locally is downloaded; '': from scratch",
                         group='checkpoints and resume')
    eval_only: bool = flag(False, 'only measure PSNR, SSIM and codebook usage on the val folder, then stop (the weights: --vae_ckpt, '
                                  'else local_out_dir_path/vae-ckpt-last.pth)', group='evaluation')
    recon_npz: str = flag('', "with --eval_only: also write the val images' reconstructions to this .npz (arr_0, N x H x W x 3 "
                              "uint8) and the originals beside it (<stem>_ref.npz), for rFID; '': none", group='evaluation')
    quant_resi: float = flag(0.5, 'the phi convs after quantisation: phi(h) = (1 - r) h + r conv(h) with r = |quant_resi|; 0: none',
                             group='model')
    using_znorm: bool = flag(False, 'the nearest codebook entry by cosine similarity instead of L2 distance', group='model')
    beta: float = flag(0.25, 'commitment weight inside the vq loss', group='losses')
    pn: str = flag(PN_SHORTCUTS['256'], "the scales: increasing token-map sides joined by '_', or 256, 512, 1024 for the "
                                        'standard sets', group='model')
    patch_size: int = flag(16, 'pixels per token side at the last scale: 16 (the tokenizer downsamples by 16), so the image side '
                               'is 16 x the last of --pn', group='model')
    mid_reso: float = flag(1.125, "augmentation: resize the short side to mid_reso x the image side (>= 1), then crop (train: at "
                                  'random, val: the centre)', group='data')
    hflip: bool = flag(False, 'augmentation: random horizontal flips', group='data')
    workers: int = flag(0, 'DataLoader worker processes per process; 0: load in the main process', group='data')
    bs: int = flag(64, 'global batch size per optimizer step, over all processes and --ac micro steps', group='optimisation')
    ac: int = flag(1, 'gradient accumulation: micro steps per optimizer step (>= 1)', group='optimisation')
    ep: int = flag(100, 'training epochs (>= 1)', group='schedule')
    lr: float = flag(1e-4, 'peak lr of the tokenizer (not scaled by the batch size)', group='optimisation')
    wd: float = flag(0.0, 'weight decay (the codebook, biases and 1-D weights get none)', group='optimisation')
    wp: float = flag(1, 'epochs of linear lr warm-up from --wp0 (>= 0)', group='schedule')
    wp0: float = flag(0.01, 'lr ratio at the start of the warm-up, in [0, 1]', group='schedule')
    wpe: float = flag(0.1, 'lr ratio at the end of training (> 0 with --sche=exp)', group='schedule')
    sche: str = flag('cos', 'lr schedule after the warm-up, down to --wpe: lin0 (flat for 5%, then linear), lin (flat for 15%), '
                            'lin00 (linear), linX (X a fraction in (0, 1), e.g. lin0.3), cos, exp', group='schedule')
    clip: float = flag(0.0, 'clip the gradient norm of the tokenizer and the discriminator at this value; <= 0: no clipping',
                       group='optimisation')
    fp16: int = flag(0, 'mixed precision: 0 float32, 1 float16 with a loss scaler, 2 bfloat16', group='optimisation')
    afuse: bool = flag(True, "fused AdamW where the device has it (PyTorch's fused=True)", group='optimisation')
    fsdp: int = flag(0, "0: DDP; 1: FSDP2, the tokenizer's weights, gradients and optimizer state sharded over the processes "
                        '(needs --disc_start=-1 --reinit_dead=0)', group='distributed')
    rec_loss: str = flag('l1', 'pixel reconstruction loss: l1 or l2', group='losses')
    rec_weight: float = flag(1.0, 'weight of the pixel reconstruction loss', group='losses')
    vq_weight: float = flag(1.0, 'weight of the multi-scale vq loss', group='losses')
    lpips_weight: float = flag(1.0, 'weight of the LPIPS perceptual loss; 0: off (no VGG weights needed)', group='losses')
    lpips_vgg: str = flag('', "a local VGG16 ImageNet weights file for LPIPS; '': torchvision's download", group='losses')
    lpips_lin: str = flag('', "a local LPIPS v0.1 linear weights file; '': the LPIPS release's download", group='losses')
    disc_start: int = flag(20000, 'iteration at which the adversarial loss of a PatchGAN discriminator starts; < 0: never (no '
                                  'discriminator)', group='losses')
    disc_weight: float = flag(0.5, 'multiplier of the adaptive adversarial weight (gradient norms at the decoder\'s last layer)',
                              group='losses')
    disc_lr: float = flag(0.0, "the discriminator's peak lr; 0: --lr", group='optimisation')
    disc_ch: int = flag(64, "the discriminator's first conv width", group='model')
    disc_layers: int = flag(3, "the discriminator's depth: its 4x4 convs halve the side this many times", group='model')
    reinit_dead: int = flag(0, 'every this many iterations, give unused codebook entries new values from the batch; 0: off',
                            group='optimisation')
    dead_threshold: float = flag(0.03, 'with --reinit_dead: an entry is unused when its hits (an EMA) fall below this fraction of '
                                       'a uniform share', group='optimisation')
    ckpt_every_min: float = flag(30, 'also write vae-ckpt-last.pth (the one before: vae-ckpt-prev.pth) every this many minutes, '
                                     'besides after every epoch; <= 0: off', group='checkpoints and resume')
    ckpt_every_it: int = flag(0, 'and every this many iterations; 0: off', group='checkpoints and resume')
    val_every_ep: int = flag(1, 'validate (PSNR, SSIM, codebook usage) every this many epochs (>= 1) and after the last; '
                                'vae-ckpt-best.pth has the highest PSNR', group='evaluation')
    nonfinite_patience: int = flag(50, 'a step with a non-finite loss or gradient is skipped; stop after this many in a row (>= 1)',
                                   group='optimisation')
    tf32: bool = flag(True, 'TensorFloat32 matmuls and convolutions on CUDA (off: IEEE float32)', group='environment')
    seed: Optional[int] = flag(None, 'seed of the initialisation, the augmentations and every step; None: drawn at random and '
                                     'recorded in the checkpoint (0 with --eval_only)', group='environment')
    same_seed_for_all_ranks: int = flag(0, "seed of the data order (every process shuffles with it and takes its slice of each "
                                           'global batch)', group='data')

    patch_nums: Tuple[int, ...] = field(default=(), metadata={'derived': True})
    data_load_reso: int = field(default=0, metadata={'derived': True})
    batch_size: int = field(default=0, metadata={'derived': True})
    glb_batch_size: int = field(default=0, metadata={'derived': True})
    world_size: int = field(default=1, metadata={'derived': True})
    cmd: str = field(default='', metadata={'derived': True})

    def finalize(self, world_size: int) -> 'VAEArgs':
        derive_scales(self)
        derive_batch(self, world_size)
        check_loop_flags(self)
        # the adversarial weight differentiates through one weight, and the dead-code re-initialisation writes rows of the
        # codebook: neither works on FSDP2 shards
        check_fsdp_flags(self, {'disc_start': (self.disc_start < 0, '--disc_start=-1'), 'reinit_dead': (self.reinit_dead == 0, '--reinit_dead=0')})
        if self.rec_loss not in ('l1', 'l2'):
            raise FlagError(f'--rec_loss={self.rec_loss!r}: use l1 or l2')
        if self.vae_ch % 32 != 0:
            raise FlagError(f'--vae_ch={self.vae_ch} must be a multiple of 32 (GroupNorm with 32 groups)')
        self.disc_lr = self.disc_lr or self.lr
        return self

    def state_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tb_name(self) -> str:
        return re.sub(r'[^\w\-+,.]', '_', f'tb-VQVAE_v{self.vocab_size}z{self.z_channels}ch{self.vae_ch}__pn{self.pn}__b{self.bs}ep{self.ep}lr{self.lr:g}')


def parse_vae_args(argv: Optional[Sequence[str]] = None) -> VAEArgs:
    return parse_dataclass(VAEArgs, argv, description='Train the multi-scale VQVAE tokenizer (torchrun or plain python).')


@dataclass
class ExtractArgs(TokenizerShape):
    """Flags of extract_tokens.py."""
    data_path: str = flag('/path/to/imagenet', 'ImageNet-style folder: train/ and val/, one subfolder of images per class',
                          group='data')
    tokens_path: str = flag('local_tokens', 'the folder to write (for train.py --tokens_path): one token array per split, '
                                            'meta.json once complete; a rerun finishes or reuses it', group='data')
    vae_ckpt: str = flag(PUBLISHED_VAE, "the tokenizer's weights: a state dict (.pth, .safetensors) or a train_vae.py "
                                        'checkpoint; a published file name not found locally is downloaded from '
                                        f'{HF_REPO}', group='model')
    pn: str = flag(PN_SHORTCUTS['256'], "the scales: increasing token-map sides joined by '_', or 256, 512, 1024 for the "
                                        'standard sets', group='model')
    patch_size: int = flag(16, 'pixels per token side at the last scale: 16 (the tokenizer downsamples by 16), so the image side '
                               'is 16 x the last of --pn', group='model')
    mid_reso: float = flag(1.125, 'resize the short side to mid_reso x the image side (>= 1), then crop the centre (the '
                                  'validation transform; --crops > 1 adds random crops of the same resize)', group='data')
    crops: int = flag(1, 'crops stored per training image, each with its horizontal flip (2 x crops views): the centre crop, '
                         'then crops - 1 random crops drawn as live training draws them; train.py --tokens_path picks one view '
                         'per image and epoch (>= 1; the disk grows with it)', group='data')
    seed: int = flag(0, 'seed of the random crops of --crops > 1: crop c of image i comes from (seed, c, i), the same for any '
                        'number of processes and on resume', group='data')
    bs: int = flag(64, 'images per process and batch (>= 1)', group='data')
    workers: int = flag(0, 'DataLoader worker processes per process; 0: load in the main process', group='data')
    tf32: bool = flag(False, 'TensorFloat32 matmuls and convolutions on CUDA (off: IEEE float32, the exact tokens)',
                      group='environment')

    patch_nums: Tuple[int, ...] = field(default=(), metadata={'derived': True})
    data_load_reso: int = field(default=0, metadata={'derived': True})
    cmd: str = field(default='', metadata={'derived': True})

    def finalize(self, world_size: int) -> 'ExtractArgs':
        derive_scales(self)
        if self.bs < 1:
            raise FlagError(f'--bs={self.bs} must be >= 1')
        if self.crops < 1:
            raise FlagError(f'--crops={self.crops} must be >= 1 (1: the centre crop and its flip only)')
        return self


def parse_extract_args(argv: Optional[Sequence[str]] = None) -> ExtractArgs:
    return parse_dataclass(ExtractArgs, argv, description='Write the multi-scale token maps of every image (and of its flip) once.')


@dataclass
class ModelFlags(TokenizerShape):
    """How sample.py and edit.py find their weights and build the models."""
    var_ckpt: str = flag('', 'VAR weights: a train.py checkpoint (it defines the model and brings its tokenizer), a save_pretrained '
                             'folder or Hub repo id (the same), or a VAR state dict (.pth, .safetensors; built from the flags); '
                             "'': the published var_d{depth}.pth (a local file, else downloaded)", group='model')
    vae_ckpt: str = flag(PUBLISHED_VAE, 'the tokenizer of a VAR state dict or published VAR: a state dict or a '
                                        'train_vae.py checkpoint; a published file name not found locally is '
                                        'downloaded (a checkpoint or folder --var_ckpt brings its own)', group='model')
    ema: bool = flag(False, 'the EMA weights of a train.py checkpoint --var_ckpt (trained with --ema)', group='model')
    depth: int = flag(16, f"VAR depth: with --var_ckpt '', which published var_d{{depth}}.pth ({_DEPTHS})", group='model')
    pn: str = flag('', "the scales: token-map sides joined by '_', or 256, 512, 1024; '': the published ones for --depth (512 px "
                       'for d36)', group='model')
    saln: Optional[bool] = flag(None, 'one AdaLN projection shared by all blocks; None: as published (on for d36 only)',
                                group='model')
    anorm: bool = flag(True, 'L2-normalised queries and keys with a learned scale (as in every published VAR)', group='model')
    num_classes: int = flag(1000, 'the classes 0 .. num_classes-1 the script may use (at most the model\'s, which its weights give)',
                            group='model')
    fuse: bool = flag(True, "flash-attn or xformers attention and flash-attn's fused MLP on CUDA where installed; off: PyTorch's "
                            'SDPA and plain layers', group='environment')
