"""Sample `per_class` images of every class for FID: PNGs named by index, then one `.npz` for the OpenAI evaluator.

    torchrun --nproc_per_node=8 sample.py --depth=16 --out=samples/d16            # published var_d16.pth
    python sample.py --var_ckpt=local_output/ar-ckpt-best.pth --per_class=10 --out=samples/mine   # every class of a run
    python sample.py --depth=16 --classes=980,goldfish,null --out=samples/three               # by id, by name, unconditional

Image i has label i // per_class (with --classes: the (i // per_class)-th class listed; 'null' is the unconditional
label of classifier-free guidance) and its own random stream, seeded by (--seed, i); the images are
computed in blocks of --bs consecutive indices, block b on process b mod (number of processes). So the
set does not depend on the number of processes, and on the CPU in float32 not on --bs either.

<out>/manifest.json records every setting that determines the pixels and a sha256 of the weights loaded
(VAR and tokenizer); it is written before the first image and stored in the npz too. A run started again
in the same --out resumes (skipping the finished images, each decoded and checked first) only when all of
it matches, and otherwise stops, naming the differences. PNGs, the manifest and the npz are written atomically.
"""
import contextlib
import json
import logging
import math
import os
import os.path as osp
import signal
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import dist
from utils.arg_util import FlagError, ModelFlags, flag, parse_dataclass, var_config_from_flags, vqvae_config_from_flags
from utils.ckpt import remove_stale_temps, write_bytes_atomic
from utils.class_names import NULL_CLASS, describe_classes, parse_classes, split_classes
from utils.cli import run_main
from utils.cpu_speed import speed_up
from utils.imgs import IMAGE_READ_ERRORS, to_uint8_BHW3
from utils.log import setup_logging
from utils.misc import (SampleFolderError, SampleSetNpz, create_npz_from_sample_folder, list_sample_indices, open_npz_arr0,
                        read_npz_manifest, sample_png_name)
from utils.model_loading import SamplingWeights, build_from_weights, given_flags, read_weights, state_fingerprint
from utils.png_writers import PngWriters, start_fork_server
from utils.run import TEST_KILL_ENV
from utils.sampling_graphs import use_cuda_graphs

logger = logging.getLogger('sample')

MANIFEST = 'manifest.json'
MANIFEST_FORMAT = 'var-sample-set/1'   # image i: label i // per_class, generator seeded by image_seed(seed, i)
WRITER_PRELOAD = ('sample',)   # multiprocessing runs this script again in each PNG-writing process: its imports done once


@dataclass
class SampleArgs(ModelFlags):
    out: str = flag('samples', 'the PNG folder (and its manifest.json); the npz is <out>.npz; a rerun with the same settings '
                               'resumes there', group='output')
    num_classes: int = flag(0, "without --classes: sample classes 0 .. num_classes-1 (at most the model's class count; 0: every "
                               "class the model knows, 1000 for the published models)",
                            group='sampling')
    per_class: int = flag(50, 'images per class (>= 1): image i has label i // per_class', group='sampling')
    classes: str = flag('', "the classes to sample, comma-separated ids or names (e.g. 980,volcano); 'null': unconditional "
                            "(the null class of classifier-free guidance); '': every class 0 .. num_classes-1", group='sampling')
    cfg: float = flag(1.5, "classifier-free guidance, from none at the first scale to cfg at the last (1.5: the reference's FID "
                           'setting; 0: none)', group='sampling')
    top_k: int = flag(900, 'keep the k most likely tokens at each position (0 .. the vocabulary size; 0: no top-k filtering)',
                      group='sampling')
    top_p: float = flag(0.96, 'nucleus filtering: keep the most likely tokens that hold this share of the probability, in (0, 1] '
                              '(1: no nucleus filtering)', group='sampling')
    more_smooth: bool = flag(False, 'Gumbel-softmax smoothing of the drawn tokens: smoother images for viewing, not for FID',
                             group='sampling')
    seed: int = flag(0, "seed of the set: image i's random stream is seeded by (seed, i), whatever the number of processes",
                     group='sampling')
    bs: int = flag(32, 'images per process and batch (>= 1; on the CPU in float32 the images do not depend on it)',
                   group='sampling')
    fp16: int = flag(0, "autocast on CUDA or the CPU: 1 float16, 2 bfloat16; 0: float32 (the reference's numbers)",
                     group='sampling')
    cuda_graphs: bool = flag(False, "on CUDA, replay each scale's transformer pass as a CUDA graph (captured at the first "
                                    'batch of each size) instead of launching its kernels one by one; the same tokens and '
                                    'images; no effect on the CPU', group='sampling')
    tf32: bool = flag(True, 'TensorFloat32 matmuls and convolutions on CUDA (off: IEEE float32)', group='environment')
    no_npz: bool = flag(False, 'write only the PNGs, not <out>.npz', group='output')
    writers: int = flag(-1, 'processes that encode and write the PNGs while the next batch is sampled (0: in the sampling '
                            'process; -1: 0 on the CPU, whose cores sample, else up to 8 per process, fewer on fewer cores); '
                            'the files are the same', group='output')
    cmd: str = field(default='', metadata={'derived': True})
    given: Tuple[str, ...] = field(default=(), metadata={'derived': True})   # the flags named on the command line


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s random stream."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x632BE59BD9B4E019) % (2 ** 63 - 1)


# ------------------------------------------------------------------ flags
def check_flags(args: SampleArgs) -> None:
    """Every flag's range, before any file is read or model built (the model's own limits come after reading its weights)."""
    for name in ('per_class', 'bs'):
        if getattr(args, name) < 1:
            raise FlagError(f'--{name}={getattr(args, name)} must be an integer >= 1')
    if args.num_classes < 0:
        raise FlagError(f"--num_classes={args.num_classes} must be 0 (every class of the model) or 1 .. the model's class count")
    if args.top_k < 0:
        raise FlagError(f'--top_k={args.top_k} must be 0 (no top-k filtering) or 1 .. the vocabulary size')
    if not (0.0 < args.top_p <= 1.0):   # also false for nan
        raise FlagError(f'--top_p={args.top_p} must be in (0, 1], e.g. 0.96 (1: no nucleus filtering)')
    if not math.isfinite(args.cfg):
        raise FlagError(f'--cfg={args.cfg} must be a finite number (1.5 is the reference\'s FID setting)')
    if args.fp16 not in (0, 1, 2):
        raise FlagError(f'--fp16={args.fp16}: use 0 (float32), 1 (float16 autocast) or 2 (bfloat16 autocast)')
    if args.writers < -1:
        raise FlagError(f'--writers={args.writers}: use 0 (write in the sampling process), N >= 1 writing processes, or -1 (chosen '
                        f'for the device)')
    vqvae_config_from_flags(args), var_config_from_flags(replace(args, num_classes=1))   # the model flags' ranges (the
    # model's class count is read off its weights: --num_classes here is how many to sample)
    if not args.out.rstrip('/'):
        raise FlagError(f'--out={args.out!r} must name a folder')
    if split_classes(args.classes) and 'num_classes' in args.given:
        raise FlagError(f'--num_classes={args.num_classes} and --classes={args.classes!r} both choose the classes to sample: '
                        f'give one of them (--classes lists them; --num_classes samples 0 .. num_classes-1)')


def class_count(args: SampleArgs) -> int:
    """How many classes the set has: the items of --classes, else --num_classes (0 until the weights are read, when it
    means every class of the model)."""
    return len(split_classes(args.classes)) or args.num_classes


def check_model_limits(args: SampleArgs, kw: Dict, labels: Optional[List[int]]) -> None:
    """Flags against the model the weights define, before it is built."""
    if labels is None and args.num_classes > kw['num_classes']:
        raise FlagError(f'--num_classes={args.num_classes} but the model knows {kw["num_classes"]} classes: '
                        f'use 1 .. {kw["num_classes"]} (classes 0 .. {kw["num_classes"] - 1} are sampled)')
    if args.top_k > kw['V']:
        raise FlagError(f'--top_k={args.top_k} exceeds the vocabulary size {kw["V"]}: use 0 (no top-k filtering) or 1 .. {kw["V"]}')


# ------------------------------------------------------------------ manifest
# key of manifest['pixels'] → how to name it to the user
_NAMES = {'per_class': '--per_class', 'num_classes': '--num_classes', 'classes': '--classes', 'cfg': '--cfg', 'top_k': '--top_k', 'top_p': '--top_p',
          'more_smooth': '--more_smooth', 'seed': '--seed', 'bs': '--bs', 'fp16': '--fp16', 'tf32': '--tf32', 'fuse': '--fuse', 'ema': '--ema',
          'device': 'device type', 'format': 'sample-set format', 'model': 'model build arguments', 'image_size': 'image size',
          'var_sha256': 'VAR weights (sha256 of the state dict)', 'vae_sha256': 'tokenizer weights (sha256 of the state dict)'}


def sampling_settings(args: SampleArgs, device: torch.device) -> Dict:
    """The settings that determine the pixels and are known before the weights are read (with --classes, its labels are
    known once the weights' class names are: make_manifest adds them in place of num_classes)."""
    every_class = {} if split_classes(args.classes) or not args.num_classes else {'num_classes': args.num_classes}   # 0: not known yet
    s = dict(format=MANIFEST_FORMAT, per_class=args.per_class, **every_class, cfg=args.cfg, top_k=args.top_k,
             top_p=args.top_p, more_smooth=args.more_smooth, seed=args.seed, fp16=args.fp16, ema=bool(args.ema), device=device.type)
    if device.type == 'cuda':   # TF32, the fused kernels and the batch's shape change CUDA's rounding; on the CPU they do not
        s.update(tf32=args.tf32, fuse=args.fuse, bs=args.bs)
    return s


def make_manifest(args: SampleArgs, device: torch.device, weights: SamplingWeights, vae, var, labels: Optional[List[int]]) -> Dict:
    """pixels: every setting that determines the pixels (with --classes, its labels), compared on a rerun; info: only recorded,
    with class_names[j] the name of the j-th class sampled (images j * per_class ...) when the weights record names
    (null for a class without one and for the unconditional label)."""
    pixels = sampling_settings(args, device)
    if labels is not None:
        pixels['classes'] = labels
    pixels.update(model={k: list(v) if isinstance(v, tuple) else v for k, v in weights.kw.items()}, image_size=vae.img_size,
                  var_sha256=state_fingerprint(var), vae_sha256=state_fingerprint(vae))
    info = dict(images=args.per_class * class_count(args), var_weights=weights.source, vae_weights=weights.vae_source, bs=args.bs,
                processes=dist.get_world_size(), torch=torch.__version__, created=time.strftime('%Y-%m-%d %H:%M:%S'), cmd=args.cmd)
    names = weights.class_names
    if names:
        info['class_names'] = [names[k] if k < len(names) else None for k in (range(args.num_classes) if labels is None else labels)]
    return dict(pixels=pixels, info=info)


def _show(v) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def manifest_differences(old: Dict, new_pixels: Dict) -> List[str]:
    """What differs between a recorded manifest's pixel settings and these (only the keys of new_pixels)."""
    old_pixels = old.get('pixels', {}) if isinstance(old, dict) else {}
    out = []
    if 'classes' in old_pixels and 'num_classes' in new_pixels:   # listed classes then, every class now
        out.append(f"--classes: {_show(old_pixels['classes'])} then, '' (every class) now")
        new_pixels = {k: v for k, v in new_pixels.items() if k != 'num_classes'}
    for k, v in new_pixels.items():
        was = old_pixels.get(k, "'' (every class)" if k == 'classes' and 'num_classes' in old_pixels else '<not recorded>')
        if was != v:
            out.append(f'{_NAMES.get(k, k)}: {_show(was)} then, {_show(v)} now')
    return out


def read_manifest(path: str) -> Optional[Dict]:
    if not osp.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SampleFolderError(f'{path} cannot be read ({type(e).__name__}: {e}); it says how the images beside it were made, '
                                f'so they cannot be trusted: use another --out, or delete the folder to start afresh') from None


def _afresh(out: str) -> str:
    return (f'rerun with the recorded settings and weights ({osp.join(out, MANIFEST)}) to finish that set, or start afresh with '
            f'another --out (or after deleting {out} and {out}.npz)')


def check_against(what: str, recorded: Optional[Dict], pixels: Dict, out: str) -> None:
    if recorded is None:
        return
    diffs = manifest_differences(recorded, pixels)
    if diffs:
        raise SampleFolderError(f'{what} was made with other settings than this run\'s: ' + '; '.join(diffs) + '. ' + _afresh(out))


def check_existing(out: str, pixels: Dict) -> Tuple[Optional[Dict], Optional[Dict]]:
    """(folder manifest, npz manifest) of an earlier run in --out, after checking them against `pixels`."""
    folder_manifest = read_manifest(osp.join(out, MANIFEST)) if osp.isdir(out) else None
    if folder_manifest is None and osp.isdir(out) and list_sample_indices(out):
        raise SampleFolderError(f'{out} holds images but no {MANIFEST}, so nothing says how they were made (an older sample.py or '
                                f'another tool): use another --out, or delete them to start afresh')
    check_against(out, folder_manifest, pixels, out)
    npz_manifest = None
    if osp.exists(out + '.npz'):
        try:
            npz_manifest = read_npz_manifest(out + '.npz')
        except Exception as e:   # not a zip, or a damaged one
            raise SampleFolderError(f'{out}.npz cannot be read ({type(e).__name__}: {e}): move it away, or use another --out') from None
        if npz_manifest is None:
            raise SampleFolderError(f'{out}.npz exists but carries no manifest, so nothing says how it was made: move it away, '
                                    f'or use another --out')
        check_against(f'{out}.npz', npz_manifest, pixels, out)
    return folder_manifest, npz_manifest


def write_manifest(path: str, manifest: Dict) -> None:
    write_bytes_atomic(json.dumps(manifest, indent=1, sort_keys=True).encode(), path)


# ------------------------------------------------------------------ files
def npz_complete(path: str, n: int, size: int) -> bool:
    """Whether path is an npz whose arr_0 holds n images of size×size (read from its header only)."""
    if not osp.isfile(path):
        return False
    try:
        zf, f, shape, _, dtype = open_npz_arr0(path)
    except Exception:  # not a zip, no arr_0, truncated: not complete
        return False
    f.close()
    zf.close()
    return tuple(shape) == (n, size, size, 3) and dtype == np.uint8


def png_ok(path: str, size: int) -> bool:
    """Whether path decodes completely to a size×size RGB image (a zero-length, truncated or foreign file does not)."""
    try:
        with PIL.Image.open(path) as im:
            im.load()
            return im.mode == 'RGB' and im.size == (size, size)
    except IMAGE_READ_ERRORS:
        return False


def finished_images(out: str, blocks: Sequence[Sequence[int]], size: int) -> set:
    """Indices of `blocks` whose PNG is there and decodes to a size×size RGB image; damaged ones are named and redone."""
    present = list_sample_indices(out)
    done = set()
    for blk in blocks:
        for i in blk:
            if i in present:
                if png_ok(osp.join(out, present[i]), size):
                    done.add(i)
                else:
                    logger.warning('%s is damaged (empty, truncated, or not a %dx%d RGB PNG): making it again',
                                   osp.join(out, present[i]), size, size)
    return done


# ------------------------------------------------------------------ sampling
def log_classes(args: SampleArgs, weights: SamplingWeights, listed: Optional[List[int]]) -> List[int]:
    """The label of each class of the set (image i: labels[i // per_class]): --classes' labels, else 0 .. num_classes-1;
    logged as '980: volcano' where the weights name their classes."""
    n = weights.var.num_classes
    labels = list(range(args.num_classes)) if listed is None else listed
    logger.info('sampling %s', describe_classes(labels, weights.class_names, n))
    if n in labels:
        logger.info("'%s' is the unconditional label %d (the 'no class' of classifier-free guidance): --cfg=%g has no effect on "
                    "its images", NULL_CLASS, n, args.cfg)
    return labels


def writer_count(args: SampleArgs, device: torch.device) -> int:
    """--writers, with -1 chosen for the device: none on the CPU (its cores are the ones sampling, so encoding beside it
    gains little), else one per core this process has, less one for the sampling process, at most 8."""
    if args.writers >= 0:
        return args.writers
    if device.type == 'cpu':
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, min(8, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)) - 1))


def sample_blocks(args: SampleArgs, var, out: str, mine: Sequence[Sequence[int]], done: set, labels: Sequence[int], N: int,
                  pngs: PngWriters, npz: Optional[SampleSetNpz] = None) -> None:
    """Sample this process's blocks of indices and hand each image not yet done to `pngs` (its PNG is written while the
    next block is sampled) and, with `npz`, every image of the blocks to it in index order; a progress bar of all N."""
    device, world = var.class_emb.weight.device, dist.get_world_size()
    amp = torch.autocast(device.type, dtype=torch.float16 if args.fp16 == 1 else torch.bfloat16, enabled=args.fp16 > 0)
    bar = tqdm(total=N, initial=N - sum(len(b) for b in mine) * world, disable=not dist.is_master(), desc='sample', unit='img',
               dynamic_ncols=True)
    t0, made = time.time(), 0
    kill_after = int(os.environ.get(TEST_KILL_ENV, 0))   # test-only: SIGKILL after this many images (utils/run.py)
    for blk in mine:
        label_B = torch.tensor([labels[i // args.per_class] for i in blk], device=device)
        with torch.inference_mode(), amp:
            img_B3HW = var.autoregressive_infer_cfg(B=len(blk), label_B=label_B, g_seed=[image_seed(args.seed, i) for i in blk],
                                                    cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth)
        arr_BHW3 = to_uint8_BHW3(img_B3HW)   # on the host, once
        for i, a_HW3 in zip(blk, arr_BHW3):
            if i not in done:
                pngs.write(a_HW3, osp.join(out, sample_png_name(i)))
            if npz is not None:
                npz.add(i, None if i in done else a_HW3)   # a finished image as its PNG holds it, read back
        made += len(blk)
        if 0 < kill_after <= made:
            pngs.drain()   # the kill lands with this many images on disk, whichever process writes them
            os.kill(os.getpid(), signal.SIGKILL)
        bar.update(len(blk) * world)
        bar.set_postfix(img_s=f'{made * world / (time.time() - t0):.2f}', refresh=False)
    bar.close()


# ------------------------------------------------------------------ main
def main(args: SampleArgs) -> str:
    check_flags(args)
    device = dist.initialize()
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    logger.info('%s', dist.describe())
    out = args.out.rstrip('/')
    check_existing(out, sampling_settings(args, device))   # the settings known so far, before the expensive work
    if device.type == 'cuda' and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    writers = writer_count(args, device)
    if writers:
        start_fork_server(WRITER_PRELOAD)   # its imports go on while the weights are read and the models built

    weights = read_weights(args, args.given)
    listed = parse_classes(args.classes, weights.var.num_classes, weights.class_names)   # before the model is built
    if listed is None and not args.num_classes:
        args.num_classes = weights.var.num_classes   # every class of the model
    check_model_limits(args, weights.kw, listed)
    N = args.per_class * class_count(args)
    extra = sorted(i for i in (list_sample_indices(out) if osp.isdir(out) else {}) if i >= N)
    if extra:
        raise SampleFolderError(f'{out} holds images beyond the {N} asked for (from index {extra[0]}): use another --out, or remove them')
    labels = log_classes(args, weights, listed)
    vae, var = build_from_weights(device, args, weights)
    speed_up(vae, var)   # cpu_kernels, where present
    use_cuda_graphs(var, enabled=args.cuda_graphs)
    manifest = make_manifest(args, device, weights, vae, var, listed)
    _, npz_manifest = check_existing(out, manifest['pixels'])
    if npz_manifest is not None and npz_complete(out + '.npz', N, vae.img_size):
        logger.info('%s.npz holds all %d images already, made with these settings and weights', out, N)
        return out + '.npz'

    if dist.is_master():
        os.makedirs(out, exist_ok=True)
        removed = remove_stale_temps(out)[0] + remove_stale_temps(osp.dirname(osp.abspath(out)), bases=[osp.basename(out) + '.npz'])[0]
        if removed:
            logger.info('removed %d temporary file(s) of a killed run: %s', len(removed), ', '.join(map(osp.basename, removed[:5])))
        if not osp.isfile(osp.join(out, MANIFEST)):
            write_manifest(osp.join(out, MANIFEST), manifest)   # before the first image
    dist.barrier()
    check_against(out, read_manifest(osp.join(out, MANIFEST)), manifest['pixels'], out)   # every process checks

    blocks = [list(range(b, min(b + args.bs, N))) for b in range(0, N, args.bs)]
    mine = [blk for bi, blk in enumerate(blocks) if bi % world == rank]
    done = finished_images(out, mine, vae.img_size)
    mine = [blk for blk in mine if not all(i in done for i in blk)]
    logger.info('%d images (%d classes x %d), %d of this process\'s already there; cfg %g, top_k %d, top_p %g, more_smooth %s, '
                'seed %d, %d per batch on %d processes', N, len(labels), args.per_class, len(done), args.cfg, args.top_k,
                args.top_p, args.more_smooth, args.seed, args.bs, world)
    # one process holds every image in index order: the npz is written from them as they are made (the finished ones read
    # back); with several, each wrote only its blocks, and the master reads all N back once they are written
    streamed = not args.no_npz and world == 1
    with PngWriters(writers, max_pending=2 * args.bs, preload=WRITER_PRELOAD) as pngs, \
            (SampleSetNpz(out, N, vae.img_size, vae.img_size) if streamed else contextlib.nullcontext()) as npz:
        sample_blocks(args, var, out, mine, done, labels, N, pngs, npz)
        pngs.drain()   # every PNG on disk before the npz that packs them is published
        if streamed:
            path = npz.close(manifest)
            logger.info('%s: arr_0 (%d, %d, %d, 3) uint8 and the manifest, written as the images were made (%d read back from '
                        'their PNGs)', path, N, vae.img_size, vae.img_size, npz.read_back)
    dist.barrier()
    if args.no_npz:
        return out
    if dist.is_master() and not streamed:
        t = time.time()
        path = create_npz_from_sample_folder(out, n=N, manifest=manifest)
        logger.info('%s: arr_0 (%d, %d, %d, 3) uint8 and the manifest in %.0fs', path, N, vae.img_size, vae.img_size, time.time() - t)
    dist.barrier()
    return out + '.npz'


def parse_sample_args(argv: Optional[List[str]] = None) -> SampleArgs:
    import sys
    args = parse_dataclass(SampleArgs, argv, description=__doc__.splitlines()[0])
    args.given = given_flags(sys.argv[1:] if argv is None else argv)
    return args


if __name__ == '__main__':
    run_main(lambda: main(parse_sample_args()))
