"""Sample `per_class` images of every class for FID: PNGs named by index, then one `.npz` for the OpenAI evaluator.

    torchrun --nproc_per_node=8 sample.py --depth=16 --out=samples/d16            # published var_d16.pth
    python sample.py --var_ckpt=local_output/ar-ckpt-best.pth --ema=1 --per_class=10 --out=samples/mine

Image i has label i // per_class and its own random stream, seeded by (--seed, i); the images are
computed in blocks of --bs consecutive indices, block b on process b mod (number of processes). So the
set does not depend on the number of processes, and with batch-invariant kernels (the CPU's) not on
--bs either. A killed run started again skips finished images; PNGs and the npz are written atomically.
"""
import logging
import os
import os.path as osp
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
from tqdm import tqdm

import dist
from utils.arg_util import FlagError, ModelFlags, parse_dataclass
from utils.cli import run_main
from utils.imgs import save_png_atomic, to_uint8_BHW3
from utils.log import setup_logging
from utils.misc import SampleFolderError, create_npz_from_sample_folder, list_sample_indices, open_npz_arr0, sample_png_name
from utils.model_loading import load_for_sampling

logger = logging.getLogger('sample')


@dataclass
class SampleArgs(ModelFlags):
    out: str = 'samples'                 # PNG folder; the npz is <out>.npz
    per_class: int = 50
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False
    seed: int = 0
    bs: int = 32                         # images per process and batch
    fp16: int = 0                        # autocast (CUDA or CPU): 1 float16, 2 bfloat16; 0 float32 (the reference's numbers)
    tf32: bool = True
    no_npz: bool = False                 # only the PNGs
    cmd: str = field(default='', metadata={'derived': True})


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s random stream."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x632BE59BD9B4E019) % (2 ** 63 - 1)


def npz_complete(path: str, n: int) -> bool:
    """Whether path is an npz whose arr_0 holds n images (read from its header only)."""
    if not osp.isfile(path):
        return False
    try:
        zf, f, shape, _, dtype = open_npz_arr0(path)
    except Exception:  # not a zip, no arr_0, truncated: not complete
        return False
    f.close()
    zf.close()
    return shape[0] == n and len(shape) == 4 and shape[-1] == 3 and dtype == np.uint8


def main(args: SampleArgs) -> str:
    device = dist.initialize()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = args.out.rstrip('/')
    if dist.is_local_master():
        os.makedirs(out, exist_ok=True)
    dist.barrier()
    setup_logging(rank)
    logger.info('%s', dist.describe())
    if args.per_class < 1 or args.num_classes < 1 or args.bs < 1:
        raise FlagError(f'--per_class, --num_classes and --bs must be >= 1 (got {args.per_class}, {args.num_classes}, {args.bs})')
    if device.type == 'cuda' and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    N = args.per_class * args.num_classes
    if npz_complete(out + '.npz', N):
        logger.info('%s.npz holds all %d images already', out, N)
        return out + '.npz'

    vae, var, _ = load_for_sampling(device, args)
    if args.num_classes > var.num_classes:
        raise FlagError(f'--num_classes={args.num_classes} but the model knows {var.num_classes} classes')
    done = set(list_sample_indices(out))
    extra = sorted(i for i in done if i >= N)
    if extra:
        raise SampleFolderError(f'{out} holds images beyond the {N} asked for (from index {extra[0]}): use another --out, or remove them')
    blocks = [list(range(b, min(b + args.bs, N))) for b in range(0, N, args.bs)]
    mine = [blk for bi, blk in enumerate(blocks) if bi % world == rank and not all(i in done for i in blk)]
    logger.info('%d images (%d classes x %d), %d already there; cfg %g, top_k %d, top_p %g, more_smooth %s, seed %d, '
                '%d per batch on %d processes', N, args.num_classes, args.per_class, len(done), args.cfg, args.top_k, args.top_p,
                args.more_smooth, args.seed, args.bs, world)

    amp = torch.autocast(device.type, dtype=torch.float16 if args.fp16 == 1 else torch.bfloat16, enabled=args.fp16 > 0)
    bar = tqdm(total=N, initial=len(done), disable=not dist.is_master(), desc='sample', unit='img', dynamic_ncols=True)
    t0, made = time.time(), 0
    for blk in mine:
        labels = torch.tensor([i // args.per_class for i in blk], device=device)
        with torch.inference_mode(), amp:
            img_B3HW = var.autoregressive_infer_cfg(B=len(blk), label_B=labels, g_seed=[image_seed(args.seed, i) for i in blk],
                                                    cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth)
        arr = to_uint8_BHW3(img_B3HW)
        for i, a in zip(blk, arr):
            if i not in done:
                save_png_atomic(a, osp.join(out, sample_png_name(i)))
        made += len(blk)
        bar.update(len(blk) * world)
        bar.set_postfix(img_s=f'{made * world / (time.time() - t0):.2f}', refresh=False)
    bar.close()
    dist.barrier()
    if args.no_npz:
        return out
    if dist.is_master():
        t = time.time()
        path = create_npz_from_sample_folder(out, n=N)
        logger.info('%s: arr_0 (%d, %d, %d, 3) uint8 in %.0fs', path, N, vae.img_size, vae.img_size, time.time() - t)
    dist.barrier()
    return out + '.npz'


def parse_sample_args(argv: Optional[List[str]] = None) -> SampleArgs:
    return parse_dataclass(SampleArgs, argv, description=__doc__.splitlines()[0])


if __name__ == '__main__':
    run_main(lambda: main(parse_sample_args()))
