"""Token maps written once by extract_tokens.py, read back as a dataset for train.py --tokens_path.

Layout of a tokens folder:
    meta.json                      what was extracted (scales, vocabulary, tokenizer fingerprint, classes, transform,
                                   fingerprint of the images, the views); written last
    train_config.json, val_config.json   the same, written when the split's arrays are created
    train_tokens.npy  (N, 2C, L)   uint16 (int32 when V > 65535): C = --crops (1 unless meta.json records crops); view 2c
                                   the tokens of crop c (crop 0 the centre, the others random), 2c + 1 its horizontal flip's
    train_labels.npy  (N,)         int64
    val_tokens.npy    (M, 1, L)    the validation images' tokens (no flip)
    val_labels.npy    (M,)
    *_done.npy                     uint8 per image: 1 once its row is written (extraction resumes from it)
"""
import hashlib
import json
import logging
import os
import os.path as osp
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.cli import UserError
from utils.data import sample_seed

__all__ = ['TokenDataset', 'build_token_datasets', 'tokenizer_fingerprint', 'images_fingerprint', 'describe_differences', 'TokensError',
           'token_dtype']

logger = logging.getLogger(__name__)

# settings a folder may leave unrecorded, and what it holds then (--crops=1 folders, and those older than the flag, record no crops)
UNRECORDED = {'crops': 1}


class TokensError(UserError, ValueError):
    """A tokens folder that is missing, incomplete or made for another model."""


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2 ** 16 else np.int32


def tokenizer_fingerprint(vae_state: Dict[str, torch.Tensor]) -> str:
    """A digest of the weights that decide the tokens (encoder, quant_conv, codebook, phi): tokens only make
    sense with the tokenizer that made them."""
    h = hashlib.sha256()
    for k in sorted(vae_state):
        if not k.startswith(('decoder.', 'post_quant_conv.')) and 'ema_vocab_hit' not in k:
            h.update(k.encode())
            h.update(vae_state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def images_fingerprint(split_root: str, samples: Sequence[Tuple[str, int]]) -> Dict:
    """What the token rows of one split are made from, without reading the images: every file's path below
    split_root, size and modification time (whole seconds), digested per class folder; raises TokensError for an
    empty file. {'files', 'bytes', 'classes': {class folder: digest}}."""
    per_class = {}   # class folder -> running sha256
    total = 0
    for path, label in samples:
        rel = osp.relpath(path, split_root)
        st = os.stat(path)
        if st.st_size == 0:
            raise TokensError(f'{path} is an empty file (0 bytes), not an image: replace it or remove it, then rerun')
        total += st.st_size
        folder = rel.split(os.sep, 1)[0]
        per_class.setdefault(folder, hashlib.sha256()).update(f'{rel}\t{label}\t{st.st_size}\t{int(st.st_mtime)}\n'.encode())
    return {'files': len(samples), 'bytes': total, 'classes': {c: h.hexdigest()[:16] for c, h in per_class.items()}}


def describe_differences(saved: Dict, now: Dict) -> List[str]:
    """What differs between the inputs recorded in a tokens folder and those of this run, one phrase each."""
    out = []
    same_crops = saved.get('crops', UNRECORDED['crops']) == now.get('crops', UNRECORDED['crops'])
    for key in dict.fromkeys([*now, *UNRECORDED]):
        value, old = now.get(key, UNRECORDED.get(key)), saved.get(key, UNRECORDED.get(key))
        if old == value or (key in ('crop_seed', 'crops_drawn') and not same_crops):   # other crops: said once, by --crops
            continue
        if key == 'crops':
            out.append(f'--crops ({old} then, {value} now; rerun with --crops={old} to finish or reuse this folder)')
        elif key == 'crop_seed':
            out.append(f'--seed, which draws the crops ({old} then, {value} now; rerun with --seed={old} to finish or reuse this folder)')
        elif key == 'tokenizer':
            out.append(f'the tokenizer weights (fingerprint {old} then, {value} now)')
        elif key == 'images':
            for split, fp in value.items():
                before = (old or {}).get(split)
                if before is None:
                    out.append(f'the {split} images (no fingerprint of them recorded: made by an older extract_tokens.py)')
                elif before != fp:
                    changed = sorted(c for c in set(before['classes']) | set(fp['classes']) if before['classes'].get(c) != fp['classes'].get(c))
                    out.append(f'the {split} images: {len(changed)} class folder{"s" if len(changed) > 1 else ""} '
                               f'({", ".join(changed[:5])}{" ..." if len(changed) > 5 else ""}) with other files, sizes or modification times '
                               f'({before["files"]} files of {before["bytes"]} bytes then, {fp["files"]} of {fp["bytes"]} now)')
        elif key == 'classes':
            out.append(f'the class folders ({len(old or [])} then, {len(value)} now)')
        else:
            out.append(f'{key} ({old!r} then, {value!r} now)')
    return out


class TokenDataset(Dataset):
    """(tokens of all scales (L,) int64, label): of one of the image's `crops` stored crops (views 2c), with hflip the flipped
    crop's tokens (views 2c + 1) half of the time.

    The choice follows a generator seeded by (seed, epoch, index), like the image datasets' augmentation and in its order: the
    flip first, then the crop.
    """

    def __init__(self, tokens_path: str, labels_path: str, hflip: bool = False, seed: int = 0, crops: int = 1):
        self.tokens = np.load(tokens_path, mmap_mode='r')
        self.labels = np.load(labels_path, mmap_mode='r')
        self.hflip, self.seed, self.crops = hflip, seed, crops
        if crops > 1 and self.tokens.shape[1] != 2 * crops:
            raise TokensError(f'{tokens_path} holds {self.tokens.shape[1]} views per image, not the {2 * crops} of {crops} crops and '
                              f'their flips that meta.json records: rerun extract_tokens.py into another --tokens_path')

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return torch.from_numpy(self.tokens[index, self.view_of(epoch, index)].astype(np.int64)), int(self.labels[index])

    def view_of(self, epoch: int, index: int) -> int:
        """The stored view that sample `index` trains on in `epoch`: 2 * crop + flip."""
        flip, crop = 0, 0
        flips = self.hflip and self.tokens.shape[1] > 1
        if flips or self.crops > 1:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            if flips:
                flip = int(torch.rand(1, generator=g).item() < 0.5)
            if self.crops > 1:
                crop = int(torch.randint(0, self.crops, (1,), generator=g))
        return 2 * crop + flip


def read_meta(tokens_dir: str) -> Dict:
    path = osp.join(tokens_dir, 'meta.json')
    if not osp.isfile(path):
        raise TokensError(f'{tokens_dir} holds no finished token extraction (no meta.json): run extract_tokens.py first, '
                          f'or rerun it to finish an interrupted extraction')
    with open(path) as f:
        return json.load(f)


def build_token_datasets(tokens_dir: str, patch_nums: Sequence[int], hflip: bool = False, seed: int = 0
                         ) -> Tuple[int, TokenDataset, TokenDataset, Dict]:
    """(number of classes, train set, val set, meta) of a tokens folder, checked against the scales of the run."""
    meta = read_meta(tokens_dir)
    if tuple(meta['patch_nums']) != tuple(patch_nums):
        raise TokensError(f'the tokens in {tokens_dir} have scales {tuple(meta["patch_nums"])}, this run uses {tuple(patch_nums)} (--pn)')
    crops = meta.get('crops', UNRECORDED['crops'])
    train = TokenDataset(osp.join(tokens_dir, 'train_tokens.npy'), osp.join(tokens_dir, 'train_labels.npy'), hflip=hflip, seed=seed,
                         crops=crops)
    if crops > 1:
        logger.info('the train tokens hold %d crops of each image and their flips: one view drawn per image and epoch', crops)
    val = TokenDataset(osp.join(tokens_dir, 'val_tokens.npy'), osp.join(tokens_dir, 'val_labels.npy'), hflip=False, seed=seed)
    return len(meta['classes']), train, val, meta
