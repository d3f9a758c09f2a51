"""Token maps written once by extract_tokens.py, read back as a dataset for train.py --tokens_path.

Layout of a tokens folder:
    meta.json                      what was extracted (scales, vocabulary, tokenizer fingerprint, classes, transform,
                                   fingerprint of the images); written last
    train_config.json, val_config.json   the same, written when the split's arrays are created
    train_tokens.npy  (N, 2, L)    uint16 (int32 when V > 65535): the image's tokens and its horizontal flip's
    train_labels.npy  (N,)         int64
    val_tokens.npy    (M, 1, L)    the validation images' tokens (no flip)
    val_labels.npy    (M,)
    *_done.npy                     uint8 per image: 1 once its row is written (extraction resumes from it)
"""
import hashlib
import json
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
    for key, value in now.items():
        old = saved.get(key)
        if old == value:
            continue
        if key == 'tokenizer':
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
    """(tokens of all scales (L,) int64, label); with hflip the flipped image's tokens half of the time.

    The choice follows a generator seeded by (seed, epoch, index), like the image datasets' augmentation.
    """

    def __init__(self, tokens_path: str, labels_path: str, hflip: bool = False, seed: int = 0):
        self.tokens = np.load(tokens_path, mmap_mode='r')
        self.labels = np.load(labels_path, mmap_mode='r')
        self.hflip, self.seed = hflip, seed

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        view = 0
        if self.hflip and self.tokens.shape[1] > 1:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            view = int(torch.rand(1, generator=g).item() < 0.5)
        return torch.from_numpy(self.tokens[index, view].astype(np.int64)), int(self.labels[index])


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
    train = TokenDataset(osp.join(tokens_dir, 'train_tokens.npy'), osp.join(tokens_dir, 'train_labels.npy'), hflip=hflip, seed=seed)
    val = TokenDataset(osp.join(tokens_dir, 'val_tokens.npy'), osp.join(tokens_dir, 'val_labels.npy'), hflip=False, seed=seed)
    return len(meta['classes']), train, val, meta
