"""Sample folders: PNGs named by their index, packed into the `.npz` the OpenAI FID evaluator reads."""
import json
import os
import os.path as osp
import re
import zipfile
from typing import Dict, List, Optional

import numpy as np
import PIL.Image

from utils.cli import UserError

__all__ = ['create_npz_from_sample_folder', 'open_npz_arr0', 'read_npz_manifest', 'NPZ_MANIFEST', 'sample_png_name', 'list_sample_indices', 'SampleFolderError']

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

    first = np.asarray(PIL.Image.open(osp.join(folder, files[0])).convert('RGB'))
    H, W, _ = first.shape
    out_path = folder + '.npz'
    tmp = f'{out_path}.tmp-{os.getpid()}'
    try:
        with zipfile.ZipFile(tmp, mode='w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open('arr_0.npy', mode='w', force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                         'fortran_order': False, 'shape': (count, H, W, 3)})
                for i in range(count):
                    img = first if i == 0 else np.asarray(PIL.Image.open(osp.join(folder, files[i])).convert('RGB'))
                    if img.shape != (H, W, 3):
                        raise SampleFolderError(f'{folder}/{files[i]} is {img.shape[1]}x{img.shape[0]}, the others {W}x{H}: '
                                                f'all samples must have one size')
                    f.write(np.ascontiguousarray(img, dtype=np.uint8).tobytes())
            if manifest is not None:
                zf.writestr(NPZ_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        with open(tmp, 'rb+') as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return out_path
