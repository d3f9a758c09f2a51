"""ImageNet-style folders (train/ and val/ with one subfolder per class) and the reference's augmentation.

Every sample's random crop and flip come from a generator seeded by (seed, epoch, index), so the
images a run sees do not depend on the number of processes or DataLoader workers, and a resumed
run sees the same ones as an uninterrupted run.
"""
import logging
import os
import os.path as osp
from typing import List, Optional, Sequence, Tuple, Union

import PIL.Image
import torch
from torch.utils.data import Dataset

from utils.cli import UserError
from utils.imgs import centre_crop_square, crop_square, hflip, load_rgb, resize_short_side, to_tensor01

__all__ = ['IMG_EXTENSIONS', 'DataFolderError', 'scan_class_folder', 'check_data_path', 'ImageFolderDataset',
           'build_dataset', 'normalize_01_into_pm1', 'sample_seed']

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')  # any case


class DataFolderError(UserError, ValueError):
    """A data folder that cannot be used; the message says what is wrong and how to fix it."""


LAYOUT_HINT = 'expected DATA_PATH/train/<class>/<image> and DATA_PATH/val/<class>/<image>'


def scan_class_folder(root: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Sorted class names and (path, class index) of every image below root/<class>/."""
    if not osp.isdir(root):
        raise DataFolderError(f'data folder {root} does not exist; {LAYOUT_HINT}')
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataFolderError(f'data folder {root} has no class subfolders; {LAYOUT_HINT}')
    exts = tuple(e.lower() for e in IMG_EXTENSIONS)
    samples: List[Tuple[str, int]] = []
    empty: List[str] = []
    for ci, c in enumerate(classes):
        n_before = len(samples)
        for dirpath, _, files in sorted(os.walk(osp.join(root, c), followlinks=True)):
            for fn in sorted(files):
                if fn.lower().endswith(exts):
                    samples.append((osp.join(dirpath, fn), ci))
        if len(samples) == n_before:
            empty.append(c)
    if not samples:
        raise DataFolderError(f'data folder {root} has {len(classes)} class folders but no images ({", ".join(IMG_EXTENSIONS)}); {LAYOUT_HINT}')
    if empty:
        raise DataFolderError(
            f'{len(empty)} of the {len(classes)} class folders of {root} hold no images ({", ".join(IMG_EXTENSIONS)}): '
            f'{", ".join(osp.join(root, c) for c in empty[:10])}{" ..." if len(empty) > 10 else ""}; '
            f'add images to them or remove them (every class folder is a class label)')
    return classes, samples


def check_data_path(data_path: str) -> Tuple[List[str], List[Tuple[str, int]], List[Tuple[str, int]]]:
    """Classes and samples of data_path/train and data_path/val, which must hold the same classes."""
    if not osp.isdir(data_path):
        raise DataFolderError(f'--data_path {data_path} does not exist; {LAYOUT_HINT}')
    for split in ('train', 'val'):
        if not osp.isdir(osp.join(data_path, split)):
            raise DataFolderError(f'--data_path {data_path} has no {split}/ folder; {LAYOUT_HINT}')
    classes, train = scan_class_folder(osp.join(data_path, 'train'))
    val_classes, val = scan_class_folder(osp.join(data_path, 'val'))
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        raise DataFolderError(
            f'the class folders of {osp.join(data_path, "val")} differ from those of {osp.join(data_path, "train")}: '
            f'only in train: {only_train[:10]}{" ..." if len(only_train) > 10 else ""}, '
            f'only in val: {only_val[:10]}{" ..." if len(only_val) > 10 else ""}; both splits need the same class folders')
    return classes, train, val


def normalize_01_into_pm1(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1]."""
    return x.add(x).add_(-1)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation."""
    return (seed * 1_000_003 + epoch * 7_919_993 + index * 104_729 + 12_345) % (2 ** 63 - 1)


class ImageFolderDataset(Dataset):
    """Images and labels of one split; indices may be ints or (epoch, index) pairs from the batch sampler.

    Training: Lanczos resize of the short side to round(mid_reso·final_reso), random crop to
    final_reso, optional horizontal flip. Validation: the same resize and a centre crop.
    Values in [-1, 1]. An unreadable image is skipped (the next readable one is used instead) with a
    warning that names it; `n_skipped` counts them across DataLoader workers.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], final_reso: int, mid_reso: float = 1.125, train: bool = True,
                 hflip: bool = False, seed: int = 0):
        self.samples = list(samples)
        self.final_reso = final_reso
        self.mid_reso = round(mid_reso * final_reso)
        self.train = train
        self.hflip = hflip
        self.seed = seed
        self.n_skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def transform(self, img: PIL.Image.Image, g: torch.Generator) -> torch.Tensor:
        if self.train and self.hflip and torch.rand(1, generator=g).item() < 0.5:
            img = hflip(img)
        return self.crop(self.resize(img), g if self.train else None)

    def resize(self, img: PIL.Image.Image) -> PIL.Image.Image:
        """Short side → mid_reso (Lanczos)."""
        return resize_short_side(img, self.mid_reso)

    def crop(self, img: PIL.Image.Image, g: Optional[torch.Generator]) -> torch.Tensor:
        """A final_reso square of a resized image in [-1, 1]: the random crop training draws from g, or with g None the centre
        (extract_tokens.py --crops draws its crops here too, so that they are the ones live training would see)."""
        r = self.final_reso
        if g is not None:
            w, h = img.size
            i = int(torch.randint(0, h - r + 1, (1,), generator=g))
            j = int(torch.randint(0, w - r + 1, (1,), generator=g))
            img = crop_square(img, i, j, r)
        else:
            img = centre_crop_square(img, r)
        return normalize_01_into_pm1(to_tensor01(img))

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        n = len(self.samples)
        for attempt in range(n):
            path, label = self.samples[(index + attempt) % n]
            try:
                img = load_rgb(path)
            except Exception as e:  # truncated, corrupt or not an image
                self.n_skipped += 1
                logger.warning('skipping unreadable image %s (%s: %s)', path, type(e).__name__, e)
                continue
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(img, g), label
        raise DataFolderError(f'none of the {n} images of the dataset could be read')


def build_dataset(data_path: str, final_reso: int, hflip: bool = False, mid_reso: float = 1.125, seed: int = 0
                  ) -> Tuple[int, ImageFolderDataset, ImageFolderDataset, List[str]]:
    """(number of classes, train set, val set, class names) of an ImageNet-style folder."""
    classes, train, val = check_data_path(data_path)
    train_set = ImageFolderDataset(train, final_reso, mid_reso=mid_reso, train=True, hflip=hflip, seed=seed)
    val_set = ImageFolderDataset(val, final_reso, mid_reso=mid_reso, train=False, hflip=False, seed=seed)
    logger.info('data %s: %d classes, %d train and %d val images, %dpx', data_path, len(classes), len(train), len(val), final_reso)
    return len(classes), train_set, val_set, classes
