"""Command-line flags of train.py: the reference's names, defaults and derived values, parsed strictly."""
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from models.config import PATCH_NUMS_256, PATCH_NUMS_512, PUBLISHED_DEPTHS, ConfigError, VARConfig, VQVAEConfig, configs_to_dict
from utils.cli import UserError
from utils.flags import flag, parse_dataclass, str2bool   # the one flag parser of every script, re-exported here

__all__ = ['ModelFlags', 'derive_scales', 'derive_batch', 'FlagError', 'Args', 'parse_args', 'VAEArgs', 'parse_vae_args', 'VAE_MODEL_KEYS', 'ExtractArgs', 'parse_extract_args', 'parse_dataclass', 'str2bool', 'PN_SHORTCUTS', 'parse_patch_nums', 'MODEL_KEYS',
           'VQVAE_FLAGS', 'VAR_FLAGS', 'vqvae_config_from_flags', 'flags_from_vqvae_config', 'var_config_from_flags', 'flags_from_var_config']

logger = logging.getLogger(__name__)


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
    vocab_size: int = 4096
    z_channels: int = 32
    vae_ch: int = 160
    share_quant_resi: int = 4


@dataclass
class Args(TokenizerShape):
    # data and experiment
    data_path: str = '/path/to/imagenet'
    exp_name: str = 'text'
    # VAE
    vfast: int = 0          # torch.compile the tokenizer; 0: no, 1: 'reduce-overhead', 2: 'max-autotune', 3: 'default'
    vae_ckpt: str = 'vae_ch160v4096z32.pth'   # local path; a published file name not found locally is downloaded from FoundationVision/var
    # VAR
    tfast: int = 0          # torch.compile VAR; same values as vfast
    depth: int = 16         # VAR depth (width 64·depth, depth heads)
    num_classes: int = 0    # 0: the number of class folders in data_path/train
    # VAR initialization
    ini: float = -1         # -1: automated init std √(1/(3C))
    hd: float = 0.02        # head.w *= hd
    aln: float = 0.5        # the multiplier of ada_lin.w's initialization
    alng: float = 1e-5      # the multiplier of ada_lin.w[gamma channels]'s initialization
    # VAR optimization
    fp16: int = 0           # 1: float16 with a loss scaler, 2: bfloat16
    tblr: float = 1e-4      # base lr
    tlr: Optional[float] = None  # derived as in the reference: lr = base lr * (bs / 256); a value given here is ignored
    fixed_tlr: float = 0    # > 0: use this peak lr as it is, not scaled by the batch size (not in the reference)
    twd: float = 0.05       # initial wd
    twde: float = 0         # final wd, = twde or twd
    tclip: float = 2.       # <= 0 for not using grad clip
    ls: float = 0.0         # label smooth
    bs: int = 768           # global batch size (per optimizer step)
    ac: int = 1             # gradient accumulation
    ep: int = 250
    wp: float = 0           # warm-up epochs; 0: ep/50
    wp0: float = 0.005      # initial lr ratio at the beginning of lr warm up
    wpe: float = 0.01       # final lr ratio at the end of training
    sche: str = 'lin0'      # lr schedule: lin0, lin, lin00, linX (X a fraction), cos, exp
    opt: str = 'adamw'
    afuse: bool = True      # fused AdamW where available
    ema: float = 0          # > 0: keep an EMA of the weights with this decay, saved beside them
    grad_ckpt: bool = False  # activation checkpointing of the transformer blocks
    fsdp: int = 0           # 1: shard weights, gradients and optimizer state over the processes (FSDP2; checkpoints: DCP folders); 0: DDP
    # other hps
    saln: bool = False      # whether to use shared adaln
    anorm: bool = True      # whether to use L2 normalized attention
    fuse: bool = True       # whether to use fused ops (flash-attn, xformers, fused MLP) when installed
    # data
    pn: str = PN_SHORTCUTS['256']
    patch_size: int = 16
    mid_reso: float = 1.125  # aug: first resize the short side to mid_reso * final size, then crop
    hflip: bool = False     # augmentation: horizontal flip
    workers: int = 0        # DataLoader worker processes per process; 0: load in the main process
    tokens_path: str = ''   # train from token maps written by extract_tokens.py instead of images
    # progressive training
    pg: float = 0.0         # > 0: progressive training during [0%, pg] of training
    pg0: int = 4            # progressive initial stage, 0: from the 1st token map, 1: from the 2nd token map, etc
    pgwp: float = 0         # warm-up epochs at each progressive stage; 0: ep/300
    # checkpoints, evaluation, logs
    ckpt_every_min: float = 30   # write ar-ckpt-last.pth every this many minutes (<= 0: off)
    ckpt_every_it: int = 0       # and every this many iterations (0: off)
    val_every_ep: int = 10       # validate (and write the checkpoints) every this many epochs and at the end
    nonfinite_patience: int = 50  # stop after this many consecutive steps with a non-finite loss or gradient
    local_out_dir_path: str = 'local_output'
    init_from: str = flag('', "start from these weights only (fresh optimizer, schedule and epoch): a published file or depth "
                              "(var_d16.pth, 16: a local file first, else the Hub), a save_pretrained folder or Hub id, a VAR state "
                              "dict, or a train.py checkpoint (its EMA weights when it has them, else its trained ones). Their shape "
                              "flags (--depth --saln --anorm --pn, the tokenizer's) are taken when not given and must agree when given; "
                              "the tokenizer comes with them unless --vae_ckpt is given; the class embedding follows the data's "
                              "classes (by name where both sides name them). A resumable checkpoint in local_out_dir_path wins; "
                              "'': from scratch", group='checkpoints and resume')
    vis_every_ep: int = 0        # tensorboard grid of samples (fixed classes and seeds, EMA weights with --ema) every this many epochs and after the last; 0: a tenth of the run; -1: never
    save_pretrained: bool = True  # at the end, write the final model (EMA weights with --ema) to local_out_dir_path/pretrained: config.json, model.safetensors, vae/
    push_to_hub: str = ''        # Hugging Face repo id: at the end, push the same folder there (checked for network and login before training)
    # environment
    tf32: bool = True       # TensorFloat32 matmuls on CUDA
    seed: Optional[int] = None   # None: a random seed, recorded in the checkpoint so that a resume continues the same streams
    same_seed_for_all_ranks: int = 0  # shuffling seed shared by all ranks

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
        check_fsdp_flags(self, {'tfast': (self.tfast == 0, '--tfast=0'), 'vfast': (self.vfast == 0, '--vfast=0')})   # compile: untested
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
    data_path: str = '/path/to/imagenet'
    exp_name: str = 'vae'
    local_out_dir_path: str = 'local_output_vae'
    vae_ckpt: str = ''           # weights to start from (fine-tuning); '' trains from scratch; a published name is downloaded
    eval_only: bool = False      # only measure PSNR, SSIM and codebook usage on the val folder, then stop
    recon_npz: str = flag('', "with --eval_only: also write the val images' reconstructions to this .npz (arr_0, N x H x W x 3 "
                              "uint8) and the originals beside it (<stem>_ref.npz), for rFID; '': none", group='evaluation')
    quant_resi: float = 0.5
    using_znorm: bool = False
    beta: float = 0.25           # commitment weight inside the vq loss
    pn: str = PN_SHORTCUTS['256']
    patch_size: int = 16
    # data
    mid_reso: float = 1.125
    hflip: bool = False
    workers: int = 0
    # optimisation
    bs: int = 64                 # global batch size
    ac: int = 1
    ep: int = 100
    lr: float = 1e-4             # peak lr of the tokenizer (not scaled by bs)
    wd: float = 0.0
    wp: float = 1                # warm-up epochs
    wp0: float = 0.01
    wpe: float = 0.1
    sche: str = 'cos'
    clip: float = 0.0            # gradient clip (<= 0: off)
    fp16: int = 0                # 1: float16 with a loss scaler, 2: bfloat16
    afuse: bool = True
    fsdp: int = 0                # 1: shard the tokenizer's weights, gradients and optimizer state over the processes (FSDP2); 0: DDP
    # losses
    rec_loss: str = 'l1'         # pixel reconstruction: l1 or l2
    rec_weight: float = 1.0
    vq_weight: float = 1.0       # weight of the multi-scale vq loss
    lpips_weight: float = 1.0    # perceptual loss weight (0: off, no VGG weights needed)
    lpips_vgg: str = ''          # VGG16 ImageNet weights file ('' : torchvision's download)
    lpips_lin: str = ''          # LPIPS v0.1 linear weights file ('' : the LPIPS release download)
    disc_start: int = 20000      # iteration at which the adversarial loss starts (< 0: never)
    disc_weight: float = 0.5
    disc_lr: float = 0.0         # 0: = lr
    disc_ch: int = 64
    disc_layers: int = 3
    reinit_dead: int = 0         # every this many iterations, re-initialise unused codebook entries (0: off)
    dead_threshold: float = 0.03  # an entry is unused when its EMA hits fall below this fraction of a uniform share
    # checkpoints and logs
    ckpt_every_min: float = 30
    ckpt_every_it: int = 0
    val_every_ep: int = 1
    nonfinite_patience: int = 50
    tf32: bool = True
    seed: Optional[int] = None
    same_seed_for_all_ranks: int = 0

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
    data_path: str = '/path/to/imagenet'
    tokens_path: str = 'local_tokens'
    vae_ckpt: str = 'vae_ch160v4096z32.pth'
    pn: str = PN_SHORTCUTS['256']
    patch_size: int = 16
    mid_reso: float = 1.125   # images: short side resized to mid_reso x the final size, then centre-cropped
    bs: int = 64              # images per process and batch
    workers: int = 0
    tf32: bool = False        # keep float32 tokenisation exact on CUDA by default

    patch_nums: Tuple[int, ...] = field(default=(), metadata={'derived': True})
    data_load_reso: int = field(default=0, metadata={'derived': True})
    cmd: str = field(default='', metadata={'derived': True})

    def finalize(self, world_size: int) -> 'ExtractArgs':
        derive_scales(self)
        if self.bs < 1:
            raise FlagError(f'--bs={self.bs} must be >= 1')
        return self


def parse_extract_args(argv: Optional[Sequence[str]] = None) -> ExtractArgs:
    return parse_dataclass(ExtractArgs, argv, description='Write the multi-scale token maps of every image (and of its flip) once.')


@dataclass
class ModelFlags(TokenizerShape):
    """How sample.py and edit.py find their weights and build the models."""
    var_ckpt: str = ''                   # train.py checkpoint or VAR state dict; '' : the published var_d{depth}.pth
    vae_ckpt: str = 'vae_ch160v4096z32.pth'
    ema: bool = False                    # the EMA weights of a train.py checkpoint
    depth: int = 16
    pn: str = ''                         # '' : the published scales for the depth (512 px for d36)
    saln: Optional[bool] = None          # None: as published (True for d36)
    anorm: bool = True
    num_classes: int = 1000
    fuse: bool = True
