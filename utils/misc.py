"""Sample folders: PNGs named by their index, packed into the `.npz` the OpenAI FID evaluator reads."""
import json
import os
import os.path as osp
import re
import zipfile
from typing import Dict, List, Optional

import numpy as np
import PIL.Image

from models.weights import fsync_dir, temporary_name
from utils.cli import UserError

__all__ = ['NpzWriter', 'SampleSetNpz', 'read_sample_png', 'create_npz_from_sample_folder', 'open_npz_arr0', 'read_npz_manifest', 'NPZ_MANIFEST', 'sample_png_name', 'list_sample_indices', 'SampleFolderError']

_INDEX_PNG = re.compile(r'^(\d+)\.png$')
NPZ_MANIFEST = 'manifest.json'   # the npz member that says how its images were made (evaluators read only arr_0)


class SampleFolderError(UserError, ValueError):
    """A sample folder whose images are missing, extra or of different sizes."""


def sample_png_name(index: int) -> str:
    return f'{index:06d}.png'


def list_sample_indices(folder: str) -> Dict[int, str]:
    """index → file name of every `<index>.png` in folder (temporary files are ignored)."""
    out = {}
    for name in os.listdir(folder):
        m = _INDEX_PNG.match(name)
        if m:
            out[int(m.group(1))] = name
    return out


def open_npz_arr0(path: str):
    """(zip, arr_0 stream positioned after its header, shape, fortran_order, dtype) of an npz; the caller closes both.

    Raises OSError, ValueError, zipfile.BadZipFile or KeyError for a file that is not an npz with arr_0.
    """
    zf = zipfile.ZipFile(path)
    try:
        f = zf.open('arr_0.npy')
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except BaseException:
        zf.close()
        raise
    return zf, f, shape, fortran, dtype


def read_npz_manifest(path: str) -> Optional[dict]:
    """The manifest (a dict) stored in an npz by create_npz_from_sample_folder, or None when it has none.

    Raises OSError, zipfile.BadZipFile or ValueError for a file that is not a zip or whose manifest is not JSON.
    """
    with zipfile.ZipFile(path) as zf:
        if NPZ_MANIFEST not in zf.namelist():
            return None
        return json.loads(zf.read(NPZ_MANIFEST).decode())


class NpzWriter:
    """An npz of arr_0 (n, H, W, 3) uint8 images written batch by batch, and an optional manifest member.

    The file grows under a temporary name (the one utils.ckpt.remove_stale_temps knows) and is fsynced and renamed by
    close(), so memory stays at one batch and a kill never leaves a partial npz. Used as a context manager, an
    exception (or leaving without close) removes the temporary file.
    """

    def __init__(self, path: str, n: int, H: int, W: int):
        self.path, self.shape, self.written = path, (n, H, W, 3), 0
        self.tmp = temporary_name(path)
        self._zf = zipfile.ZipFile(self.tmp, mode='w', compression=zipfile.ZIP_STORED, allowZip64=True)
        self._f = self._zf.open('arr_0.npy', mode='w', force_zip64=True)
        np.lib.format.write_array_header_2_0(self._f, {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                       'fortran_order': False, 'shape': self.shape})

    def write(self, imgs_bHW3: np.ndarray) -> None:
        """Append images (b, H, W, 3) uint8 (or one (H, W, 3) image)."""
        imgs_bHW3 = imgs_bHW3[None] if imgs_bHW3.ndim == 3 else imgs_bHW3
        if imgs_bHW3.dtype != np.uint8 or imgs_bHW3.shape[1:] != self.shape[1:]:
            raise ValueError(f'{self.path}: images of {imgs_bHW3.dtype} {imgs_bHW3.shape[1:]}, the file holds uint8 {self.shape[1:]}')
        if self.written + len(imgs_bHW3) > self.shape[0]:
            raise ValueError(f'{self.path}: {self.written + len(imgs_bHW3)} images written, the file holds {self.shape[0]}')
        self._f.write(np.ascontiguousarray(imgs_bHW3).tobytes())
        self.written += len(imgs_bHW3)

    def close(self, manifest: Optional[dict] = None) -> str:
        """Finish the file (all n images must have been written), store `manifest` as manifest.json, and publish it."""
        if self.written != self.shape[0]:
            raise ValueError(f'{self.path}: {self.written} of its {self.shape[0]} images written')
        self._f.close()
        if manifest is not None:
            self._zf.writestr(NPZ_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        self._zf.close()
        with open(self.tmp, 'rb+') as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        fsync_dir(osp.dirname(osp.abspath(self.path)))
        return self.path

    def discard(self) -> None:
        for closable in (self._f, self._zf):
            try:
                closable.close()
            except (OSError, ValueError):   # an unfinished member or archive: it is removed anyway
                pass
        if osp.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self) -> 'NpzWriter':
        return self

    def __exit__(self, *exc) -> None:
        if osp.exists(self.tmp):
            self.discard()


def read_sample_png(path: str) -> np.ndarray:
    """A sample PNG as the npz holds it: (H, W, 3) uint8 RGB."""
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert('RGB'))


class SampleSetNpz:
    """`folder + '.npz'` of the images 0 .. n-1 in index order, written while they are made (an NpzWriter).

    add(i, img) gives image i in memory, written as it is: the pixels its PNG holds, since PNG is lossless; add(i)
    and every index skipped read the PNG in `folder` back (one an earlier run or another process wrote). close()
    reads back the rest up to n and publishes the file: the same arr_0 and manifest as create_npz_from_sample_folder.
    """

    def __init__(self, folder: str, n: int, H: int, W: int):
        self.folder, self.n, self.next, self.read_back = folder.rstrip('/'), n, 0, 0
        self._names = list_sample_indices(self.folder) if osp.isdir(self.folder) else {}   # as create_npz_from_sample_folder finds them
        self._writer = NpzWriter(self.folder + '.npz', n, H, W)

    def add(self, index: int, img_HW3: Optional[np.ndarray] = None) -> None:
        if index < self.next:
            raise ValueError(f'{self._writer.path}: image {index} given after image {self.next - 1} (images go in index order)')
        self._read_up_to(index)
        if img_HW3 is None:
            self._read_up_to(index + 1)
        else:
            self._writer.write(img_HW3)
            self.next = index + 1

    def _read_up_to(self, stop: int) -> None:
        for i in range(self.next, stop):
            path = osp.join(self.folder, self._names.get(i, sample_png_name(i)))
            if not osp.isfile(path):
                raise SampleFolderError(f'{path} is missing: the npz needs images 0 .. {self.n - 1}; rerun the sampler to finish them')
            self._writer.write(read_sample_png(path))
            self.read_back += 1
        self.next = max(self.next, stop)

    def close(self, manifest: Optional[dict] = None) -> str:
        self._read_up_to(self.n)
        return self._writer.close(manifest)

    def __enter__(self) -> 'SampleSetNpz':
        return self

    def __exit__(self, *exc) -> None:
        self._writer.__exit__(*exc)


def _ranges(idx: List[int], limit: int = 8) -> str:
    shown = ', '.join(str(i) for i in idx[:limit])
    return shown + (f' ... ({len(idx)} in all)' if len(idx) > limit else '')


def create_npz_from_sample_folder(folder: str, n: Optional[int] = None, manifest: Optional[dict] = None) -> str:
    """Pack folder/000000.png … into `folder + '.npz'` with arr_0 (n, H, W, 3) uint8, in index order.

    n: the expected number of images (checked); None takes every indexed PNG, which must be 0 … count − 1.
    manifest: stored as the member `manifest.json` beside arr_0 (read it back with read_npz_manifest).
    The npz is streamed to a temporary file and renamed, so memory stays at one image and a kill never
    leaves a partial npz. Raises SampleFolderError for missing, extra or differently sized images.
    """
    folder = folder.rstrip('/')
    if not osp.isdir(folder):
        raise SampleFolderError(f'sample folder {folder} does not exist')
    files = list_sample_indices(folder)
    count = len(files) if n is None else n
    if count < 1:
        raise SampleFolderError(f'sample folder {folder} holds no <index>.png images')
    missing = [i for i in range(count) if i not in files]
    extra = sorted(i for i in files if i >= count)
    if missing:
        raise SampleFolderError(f'{folder}: {len(missing)} of the {count} images are missing (indices {_ranges(missing)}); '
                                f'rerun the sampler to finish them')
    if extra:
        raise SampleFolderError(f'{folder}: {len(extra)} images beyond the expected {count} (indices {_ranges(extra)}); '
                                f'remove them or pass n={count + len(extra)}')

    first = read_sample_png(osp.join(folder, files[0]))
    H, W, _ = first.shape
    with NpzWriter(folder + '.npz', count, H, W) as out:
        for i in range(count):
            img = first if i == 0 else read_sample_png(osp.join(folder, files[i]))
            if img.shape != (H, W, 3):
                raise SampleFolderError(f'{folder}/{files[i]} is {img.shape[1]}x{img.shape[0]}, the others {W}x{H}: '
                                        f'all samples must have one size')
            out.write(img.astype(np.uint8, copy=False))
        return out.close(manifest)
