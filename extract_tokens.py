"""Write the multi-scale token maps of every training image and of its horizontal flip once, for `train.py --tokens_path`.

    torchrun --nproc_per_node=8 extract_tokens.py --data_path=/path/to/imagenet --tokens_path=/path/to/tokens

Images go through the validation transform (short side resized to mid_reso × the final size, centre
crop), so training from tokens has no augmentation beyond the flip. Every process writes its share of
the rows of one memory-mapped array per split; a killed extraction resumes where it stopped, and
meta.json appears only once every row is written.
"""
import json
import logging
import os
import os.path as osp
import time
from typing import Dict, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import dist
from models import VQVAE, build_vqvae
from utils.arg_util import ExtractArgs, parse_extract_args, vqvae_config_from_flags
from utils.cli import run_main
from utils.data import ImageFolderDataset, check_data_path
from utils.hub import resolve_checkpoint
from utils.log import setup_logging
from utils.token_data import TokensError, token_dtype, tokenizer_fingerprint

logger = logging.getLogger('extract_tokens')


def open_split(out_dir: str, split: str, n: int, views: int, L: int, dtype, config: Dict) -> Tuple[np.memmap, np.memmap, np.memmap]:
    """Create (rank 0) or open the arrays of one split; an unfinished extraction of the same config is continued."""
    paths = [osp.join(out_dir, f'{split}_{k}.npy') for k in ('tokens', 'labels', 'done')]
    cfg_path = osp.join(out_dir, f'{split}_config.json')
    if dist.is_master():
        fresh = not all(osp.isfile(p) for p in paths + [cfg_path])
        if not fresh:
            with open(cfg_path) as f:
                if json.load(f) != config:
                    raise TokensError(f'{out_dir} holds an extraction made with other settings or another tokenizer; '
                                      f'use another --tokens_path or delete that folder')
        else:
            np.lib.format.open_memmap(paths[0], mode='w+', dtype=dtype, shape=(n, views, L)).flush()
            np.lib.format.open_memmap(paths[1], mode='w+', dtype=np.int64, shape=(n,)).flush()
            np.lib.format.open_memmap(paths[2], mode='w+', dtype=np.uint8, shape=(n,)).flush()
            with open(cfg_path + '.tmp', 'w') as f:
                json.dump(config, f)
            os.replace(cfg_path + '.tmp', cfg_path)
    dist.barrier()
    return tuple(np.load(p, mmap_mode='r+') for p in paths)


@torch.no_grad()
def extract_split(vae: VQVAE, dataset: ImageFolderDataset, arrays, views: int, args: ExtractArgs, device, desc: str) -> int:
    tokens, labels, done = arrays
    pending = np.flatnonzero(np.asarray(done) == 0)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = pending[rank::world].tolist()
    loader = DataLoader(Subset(dataset, mine), batch_size=args.bs, num_workers=args.workers, shuffle=False, drop_last=False)
    bar = tqdm(total=len(pending), disable=not dist.is_master(), desc=desc, unit='img', dynamic_ncols=True)
    pos = 0
    for img_B3HW, label_B in loader:
        idx = mine[pos:pos + len(label_B)]
        pos += len(label_B)
        img_B3HW = img_B3HW.to(device, non_blocking=True)
        out_BvL = []
        for v in range(views):
            x = img_B3HW if v == 0 else img_B3HW.flip(-1)
            out_BvL.append(torch.cat(vae.img_to_idxBl(x), dim=1))
        rows = torch.stack(out_BvL, dim=1).cpu().numpy().astype(tokens.dtype)
        tokens[idx] = rows
        labels[idx] = label_B.numpy()
        tokens.flush()
        labels.flush()
        done[idx] = 1   # after the rows themselves are on disk
        done.flush()
        bar.update(len(idx) * world)
    bar.close()
    return len(mine)


def main(args: ExtractArgs) -> str:
    device = dist.initialize()
    if dist.is_local_master():
        os.makedirs(args.tokens_path, exist_ok=True)
    dist.barrier()
    setup_logging(dist.get_rank(), osp.join(args.tokens_path, 'stdout.txt'))
    args.finalize(dist.get_world_size())
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    logger.info('%s', dist.describe())
    meta_path = osp.join(args.tokens_path, 'meta.json')
    if osp.isfile(meta_path):
        logger.info('%s is complete already', args.tokens_path)
        return args.tokens_path

    classes, train_samples, val_samples = check_data_path(args.data_path)
    vae = build_vqvae(vqvae_config_from_flags(args), device)
    path = resolve_checkpoint(args.vae_ckpt) if dist.is_local_master() else None
    dist.barrier()
    path = path or resolve_checkpoint(args.vae_ckpt)
    state = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(state, dict) and isinstance(state.get('trainer'), dict) and 'vae_wo_ddp' in state['trainer']:
        state = state['trainer']['vae_wo_ddp']
    vae.load_state_dict(state, strict=True)
    vae.eval()
    fingerprint = tokenizer_fingerprint(vae.state_dict())
    L = sum(pn * pn for pn in args.patch_nums)
    config = {'patch_nums': list(args.patch_nums), 'vocab_size': args.vocab_size, 'tokenizer': fingerprint, 'mid_reso': args.mid_reso,
              'final_reso': args.data_load_reso, 'classes': classes}
    t0 = time.time()
    counts = {}
    for split, samples, views in (('train', train_samples, 2), ('val', val_samples, 1)):
        ds = ImageFolderDataset(samples, args.data_load_reso, mid_reso=args.mid_reso, train=False)
        arrays = open_split(args.tokens_path, split, len(samples), views, L, token_dtype(args.vocab_size), {**config, 'n': len(samples)})
        extract_split(vae, ds, arrays, views, args, device, desc=f'{split} tokens')
        dist.barrier()
        if dist.is_master() and not np.all(np.asarray(arrays[2]) == 1):
            raise RuntimeError(f'{split}: some rows were not written; rerun to finish')
        counts[split] = len(samples)
    if dist.is_master():
        meta = {**config, 'n_train': counts['train'], 'n_val': counts['val'], 'views': {'train': ['image', 'hflip'], 'val': ['image']},
                'vae_ckpt': osp.abspath(path), 'seconds': round(time.time() - t0, 1)}
        with open(meta_path + '.tmp', 'w') as f:
            json.dump(meta, f, indent=1)
        os.replace(meta_path + '.tmp', meta_path)
    dist.barrier()
    logger.info('token maps of %d train images (and their flips) and %d val images in %s (%.0fs)', counts['train'], counts['val'],
                args.tokens_path, time.time() - t0)
    return args.tokens_path


if __name__ == '__main__':
    run_main(lambda: main(parse_extract_args()))
