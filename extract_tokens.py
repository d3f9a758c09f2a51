"""Write the multi-scale token maps of every training image and of its horizontal flip once, for `train.py --tokens_path`.

    torchrun --nproc_per_node=8 extract_tokens.py --data_path=/path/to/imagenet --tokens_path=/path/to/tokens

Images go through the validation transform (short side resized to mid_reso × the final size, centre
crop), so training from tokens has no augmentation beyond the flip; --crops=N adds N - 1 random crops of
the same resize per training image, drawn as live training draws its crops (each with its flip), and
train.py picks one of the 2N views per image and epoch. Every process writes its share of the rows of
one memory-mapped array per split; a killed extraction resumes where it stopped, and meta.json appears
only once every row is written.

A tokens folder records what it was made from: every image's path, size and modification time (digested
per class folder), the transform and the tokenizer's weights. A rerun finishes or reuses it only when all
of these match, and otherwise stops naming each difference, before any model is built. The arrays are
allocated on the disk in full before any row is written, so a full disk is a clear error at the start,
never a crash halfway; an unreadable image is an error naming the file.
"""
import errno
import json
import logging
import os
import os.path as osp
import shutil
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import dist
from models import VQVAE, build_vqvae
from utils.arg_util import ExtractArgs, parse_extract_args, vqvae_config_from_flags
from utils.cli import run_main
from utils.cpu_speed import speed_up
from utils.data import ImageFolderDataset, check_data_path, sample_seed
from utils.imgs import IMAGE_READ_ERRORS, load_rgb
from utils.log import setup_logging
from utils.token_data import TokensError, describe_differences, images_fingerprint, token_dtype, tokenizer_fingerprint
from utils.weights import load_tokenizer_state

logger = logging.getLogger('extract_tokens')

TRANSFORM = 'Lanczos resize of the short side to round(mid_reso * final_reso), centre crop to final_reso; views: image (+ hflip for train)'
# recorded (with crops and crop_seed) only by --crops > 1, so that the files of --crops=1 stay those of before the flag
CROPS_DRAWN = ('train views 2c and 2c+1 for c >= 1: a random crop of the same resize, drawn as the training transform draws it '
               '(utils/data.py ImageFolderDataset.crop) from a torch.Generator seeded by sample_seed(crop_seed, c, image index), '
               'and its hflip')
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def view_names(crops: int) -> List[str]:
    """The train views in their order: crop c at 2c, its flip at 2c + 1; crop 0 the centre."""
    names = ['image', 'hflip']
    for c in range(1, crops):
        names += [f'random crop {c}', f'random crop {c} hflip']
    return names


class StrictImages(ImageFolderDataset):
    """Every image as ([crop_3HW] * crops, label, error): the validation transform's centre crop, then crops - 1 random crops of
    the same resize, crop c of image i drawn from sample_seed(seed, c, i) whichever process reads it. An unreadable image is
    reported by the caller (naming the file), never replaced by another image."""

    def __init__(self, samples, final_reso: int, mid_reso: float, crops: int = 1, seed: int = 0):
        super().__init__(samples, final_reso, mid_reso=mid_reso, train=False, seed=seed)
        self.crops = crops

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            img = load_rgb(path)   # the data sets' one loader (every PIL mode, EXIF orientation)
        except IMAGE_READ_ERRORS as e:   # truncated, corrupt or not an image
            return [torch.zeros(3, self.final_reso, self.final_reso)] * self.crops, label, f'{type(e).__name__}: {e}'
        img = self.resize(img)   # once for all its crops
        crops_3HW = [self.crop(img, None)]
        crops_3HW += [self.crop(img, torch.Generator().manual_seed(sample_seed(self.seed, c, index))) for c in range(1, self.crops)]
        return crops_3HW, label, ''


def on_master(fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0 only and return its result on every rank; its TokensError is raised on every rank, so that no
    rank waits at a barrier for one that stopped."""
    result, msg = None, None
    if dist.is_master():
        try:
            result = fn()
        except TokensError as e:
            msg = str(e)
    result, msg = dist.broadcast_object((result, msg))
    if msg:
        raise TokensError(msg)
    return result


def size_str(n_bytes: int) -> str:
    return f'{n_bytes / 2 ** 30:.2f} GiB' if n_bytes >= 2 ** 30 else f'{n_bytes / 2 ** 20:.2f} MiB' if n_bytes >= 2 ** 20 else f'{n_bytes} bytes'


def no_room(path: str, n_bytes: int, e: OSError) -> TokensError:
    return TokensError(f'no room on the disk for {path} ({size_str(n_bytes)}: {e.strerror}); free some space (or raise the '
                       f'quota or file size limit) and rerun, or use another --tokens_path; nothing half-written was kept')


def write_json(path: str, obj: Dict) -> None:
    """Temporary file, fsync, rename: a kill or a full disk never leaves a partial file."""
    tmp = path + '.tmp'
    text = json.dumps(obj, indent=1)
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if osp.exists(tmp):
            os.remove(tmp)
        if e.errno in NO_ROOM:
            raise no_room(path, len(text), e) from None
        raise


def allocate_npy(path: str, shape: Tuple[int, ...], dtype) -> None:
    """An .npy of zeros with every block allocated on the disk (so that writing through its memory map can never meet a full
    disk), made under a temporary name and renamed; a full disk is a TokensError and leaves nothing behind."""
    tmp = path + '.tmp'
    try:
        arr = np.lib.format.open_memmap(tmp, mode='w+', dtype=dtype, shape=shape)
        offset, size = arr.offset, arr.offset + arr.nbytes
        del arr
        fd = os.open(tmp, os.O_RDWR)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except (AttributeError, OSError) as e:   # no posix_fallocate here, or not on this file system: write the zeros
                if isinstance(e, OSError) and e.errno in NO_ROOM:
                    raise
                os.lseek(fd, offset, os.SEEK_SET)
                chunk = bytes(1 << 20)
                for start in range(offset, size, len(chunk)):
                    os.write(fd, chunk[:min(len(chunk), size - start)])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if osp.exists(tmp):
            os.remove(tmp)
        if e.errno in NO_ROOM:
            raise no_room(path, int(np.prod(shape)) * np.dtype(dtype).itemsize, e) from None
        raise


def split_arrays(out_dir: str, split: str, n: int, views: int, L: int, dtype) -> Dict[str, Tuple[str, Tuple[int, ...], type]]:
    """{name: (path, shape, dtype)} of the arrays of one split."""
    return {'tokens': (osp.join(out_dir, f'{split}_tokens.npy'), (n, views, L), dtype),
            'labels': (osp.join(out_dir, f'{split}_labels.npy'), (n,), np.int64),
            'done': (osp.join(out_dir, f'{split}_done.npy'), (n,), np.uint8)}


def check_folder(out_dir: str, config: Dict) -> bool:
    """True when out_dir holds this extraction finished; a TokensError when it holds (part of) an extraction of other inputs."""
    for name, finished in (('meta.json', True), ('train_config.json', False), ('val_config.json', False)):
        path = osp.join(out_dir, name)
        if not osp.isfile(path):
            continue
        with open(path) as f:
            saved = json.load(f)
        diffs = describe_differences(saved, {k: v for k, v in config.items() if k != 'n'})
        if diffs:
            raise TokensError(f'{out_dir} holds {"a finished" if finished else "an unfinished"} extraction made from other inputs: '
                              f'{"; ".join(diffs)}. Use another --tokens_path, or delete {out_dir} to start afresh')
        if finished:
            return True
    return False


def check_room(out_dir: str, arrays) -> None:
    """Before any model is built: the disk holds the arrays still to be created."""
    need = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize + 128 for path, shape, dtype in arrays if not osp.isfile(path))
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise TokensError(f'the token arrays need {size_str(need)} in {out_dir}, its disk has {size_str(free)} free: '
                          f'free some space or use another --tokens_path')


def open_split(out_dir: str, split: str, n: int, views: int, L: int, dtype, config: Dict) -> Tuple[np.memmap, np.memmap, np.memmap]:
    """Create (rank 0) or open the arrays of one split; an unfinished extraction of the same inputs is continued."""
    arrays = split_arrays(out_dir, split, n, views, L, dtype)
    cfg_path = osp.join(out_dir, f'{split}_config.json')

    def create():
        if not (osp.isfile(cfg_path) and all(osp.isfile(p) for p, _, _ in arrays.values())):
            try:
                for path, shape, dt in arrays.values():
                    allocate_npy(path, shape, dt)
                write_json(cfg_path, {**config, 'n': n})   # last: the arrays are complete files
            except TokensError:   # no room: none of this split's arrays stays
                for path, _, _ in arrays.values():
                    if osp.exists(path):
                        os.remove(path)
                raise
    on_master(create)
    return tuple(np.load(p, mmap_mode='r+') for p, _, _ in arrays.values())


@torch.no_grad()
def extract_split(vae: VQVAE, dataset: StrictImages, arrays, views: int, args: ExtractArgs, device, desc: str) -> int:
    tokens, labels, done = arrays
    pending = np.flatnonzero(np.asarray(done) == 0)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = pending[rank::world].tolist()
    loader = DataLoader(Subset(dataset, mine), batch_size=args.bs, num_workers=args.workers, shuffle=False, drop_last=False)
    bar = tqdm(total=len(pending), disable=not dist.is_master(), desc=desc, unit='img', dynamic_ncols=True)
    pos = 0
    for crops_B3HW, label_B, error_B in loader:   # crops_B3HW: one batch per crop
        idx = mine[pos:pos + len(label_B)]
        pos += len(label_B)
        for i, err in zip(idx, error_B):
            if err:
                raise TokensError(f'{dataset.samples[i][0]} cannot be read as an image ({err}). Replace or remove that file; as the '
                                  f'images then differ from those recorded, delete {args.tokens_path} (or use another --tokens_path) '
                                  f'and rerun')
        out_BvL = []
        for img_B3HW in crops_B3HW:   # views 2c and 2c + 1 of train (the crop, its flip); the one view of val
            img_B3HW = img_B3HW.to(device, non_blocking=True)
            for v in range(views // len(crops_B3HW)):
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

    # what the tokens are made of: the images (listed, not read), the transform, the tokenizer's weights
    classes, train_samples, val_samples = check_data_path(args.data_path)
    splits = (('train', train_samples, 2 * args.crops), ('val', val_samples, 1))
    state, path = load_tokenizer_state(args.vae_ckpt)   # .safetensors, .pth, a train_vae.py checkpoint or the published name
    L = sum(pn * pn for pn in args.patch_nums)
    dtype = token_dtype(args.vocab_size)
    config = {'patch_nums': list(args.patch_nums), 'vocab_size': args.vocab_size, 'tokenizer': tokenizer_fingerprint(state),
              'mid_reso': args.mid_reso, 'final_reso': args.data_load_reso, 'transform': TRANSFORM, 'classes': classes}
    if args.crops > 1:
        config.update(crops=args.crops, crop_seed=args.seed, crops_drawn=CROPS_DRAWN)

    def check_inputs() -> bool:   # on rank 0 (which alone writes the config), before any model is built or image read
        config['images'] = {split: images_fingerprint(osp.join(args.data_path, split), samples) for split, samples, _ in splits}
        finished = check_folder(args.tokens_path, config)
        if not finished:
            check_room(args.tokens_path, [a for split, samples, views in splits
                                          for a in split_arrays(args.tokens_path, split, len(samples), views, L, dtype).values()])
        return finished
    if on_master(check_inputs):
        logger.info('%s is complete already (same images, transform and tokenizer)', args.tokens_path)
        return args.tokens_path

    vae = build_vqvae(vqvae_config_from_flags(args), device)
    vae.load_state_dict(state, strict=True)
    vae.eval()
    speed_up(vae)
    t0 = time.time()
    counts = {}
    for split, samples, views in splits:
        ds = StrictImages(samples, args.data_load_reso, args.mid_reso, crops=args.crops if split == 'train' else 1, seed=args.seed)
        arrays = open_split(args.tokens_path, split, len(samples), views, L, dtype, config)
        extract_split(vae, ds, arrays, views, args, device, desc=f'{split} tokens')
        dist.barrier()
        if dist.is_master() and not np.all(np.asarray(arrays[2]) == 1):
            raise RuntimeError(f'{split}: some rows were not written; rerun to finish')
        counts[split] = len(samples)
    if dist.is_master():
        write_json(osp.join(args.tokens_path, 'meta.json'),
                   {**config, 'n_train': counts['train'], 'n_val': counts['val'],
                    'views': {'train': view_names(args.crops), 'val': ['image']}, 'vae_ckpt': osp.abspath(path),
                    'seconds': round(time.time() - t0, 1)})
    dist.barrier()
    logger.info('token maps of %d train images (%s) and %d val images in %s (%.0fs)', counts['train'],
                'and their flips' if args.crops == 1 else f'{args.crops} crops of each and their flips', counts['val'], args.tokens_path,
                time.time() - t0)
    return args.tokens_path


if __name__ == '__main__':
    run_main(lambda: main(parse_extract_args()))
