"""sample.py's export: PNGs encoded by worker processes (--writers) while the next batch is sampled, the npz written from
the images in memory in index order (finished ones read back): the same bytes as encoding inline and packing the folder
afterwards (create_npz_from_sample_folder), after a kill too; a failed write ends the run naming the file."""
import json
import os
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch

from conftest import run_and_kill_after_checkpoint, run_script
from utils.imgs import save_png_atomic
from utils.misc import SampleFolderError, SampleSetNpz, create_npz_from_sample_folder
from utils.png_writers import PngWriteError, PngWriters

from test_sample import PNGS, sample_flags, tiny_ckpts  # noqa: F401  (tiny_ckpts: the fixture, shared)

SET = ['--per_class=3', '--bs=4', '--seed=1']   # 15 images in 4 blocks


def npz_members(path):
    """(name, CRC, size, bytes) of every member in order: all of the file but the members' timestamps."""
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, i.CRC, i.file_size, i.compress_type, zf.read(i)) for i in zf.infolist()]


def listing(folder):
    return sorted(os.listdir(folder))


def images(n, size=32, seed=0):
    """Sample-like uint8 images: smooth patches with noise (they compress as photos do), one flat, one of pure noise."""
    rng = np.random.RandomState(seed)
    out = [np.clip(np.kron(rng.randint(0, 256, (size // 8, size // 8, 3)), np.ones((8, 8, 1))) + rng.randn(size, size, 3) * 6, 0, 255)
           for _ in range(n - 2)]
    out += [np.full((size, size, 3), 7), rng.randint(0, 256, (size, size, 3))]
    return np.stack(out).astype(np.uint8)


@pytest.fixture(scope='module')
def exported(tiny_ckpts, tmp_path_factory):
    """A set written with two PNG-writing processes and the npz written as the images were made."""
    out = tmp_path_factory.mktemp('pool') / 'set'
    res = run_script(sample_flags(tiny_ckpts, out, *SET, '--writers=2'))
    return out, res


# ------------------------------------------------------------------ the pool and the npz, in-process
@pytest.mark.parametrize('workers', [0, 2])
def test_png_writers_write_the_bytes_of_save_png_atomic(tmp_path, workers):
    imgs_BHW3 = images(10)
    (tmp_path / 'pool').mkdir()
    (tmp_path / 'ref').mkdir()
    with PngWriters(workers, max_pending=3) as w:
        for i, a in enumerate(imgs_BHW3):
            w.write(a, str(tmp_path / 'pool' / f'{i}.png'))
            assert len(w._pending) <= 3, 'at most max_pending images queued'
    for i, a in enumerate(imgs_BHW3):
        save_png_atomic(a, str(tmp_path / 'ref' / f'{i}.png'))
        assert (tmp_path / 'pool' / f'{i}.png').read_bytes() == (tmp_path / 'ref' / f'{i}.png').read_bytes(), i
    assert listing(tmp_path / 'pool') == listing(tmp_path / 'ref'), 'no temporary files left'


@pytest.mark.parametrize('workers', [0, 2])
def test_a_failed_write_is_raised_naming_the_file(tmp_path, workers):
    blocked = tmp_path / 'blocked.png'   # a folder where the PNG should go: the rename onto it fails
    blocked.mkdir()
    (blocked / 'x').write_bytes(b'')
    with pytest.raises(PngWriteError, match=re.escape(f'cannot write {blocked}: IsADirectoryError: ') + '.*rerun the same command'):
        with PngWriters(workers, max_pending=4) as w:
            w.write(images(3)[0], str(tmp_path / 'a.png'))
            w.write(images(3)[1], str(blocked))
            w.write(images(3)[2], str(tmp_path / 'c.png'))
            w.drain()
    with pytest.raises(PngWriteError, match=re.escape(f'cannot write {tmp_path / "float.png"}: TypeError')):   # in the encoder
        with PngWriters(workers, max_pending=4) as w:
            w.write(images(1)[0].astype(np.float64), str(tmp_path / 'float.png'))
            w.drain()
    assert (tmp_path / 'a.png').is_file() and not (tmp_path / 'float.png').exists()
    assert not [n for n in listing(tmp_path) if '.tmp-' in n], 'the failed writes left no temporary file'


def test_sample_set_npz_is_create_npz_from_sample_folder(tmp_path):
    """Images given in memory, given as read back (None) and skipped: the members of the folder's npz, byte for byte."""
    imgs_BHW3, folder = images(9), tmp_path / 'set'
    folder.mkdir()
    for i, a in enumerate(imgs_BHW3):
        save_png_atomic(a, str(folder / f'{i:06d}.png'))
    manifest = {'pixels': {'seed': 1}, 'info': {'images': 9}}
    ref = tmp_path / 'ref'
    shutil.copytree(folder, ref)
    create_npz_from_sample_folder(str(ref), n=9, manifest=manifest)
    with SampleSetNpz(str(folder), 9, 32, 32) as npz:
        for i in (2, 3, 4):
            npz.add(i, imgs_BHW3[i])   # 0 and 1 read back first
        npz.add(5)
        npz.add(7, imgs_BHW3[7])       # 6 read back
        with pytest.raises(ValueError, match='image 6 given after image 7'):
            npz.add(6, imgs_BHW3[6])
        path = npz.close(manifest)     # 8 read back
    assert path == str(folder) + '.npz' and npz.read_back == 5
    assert npz_members(path) == npz_members(str(ref) + '.npz')
    (folder / '000004.png').unlink()
    with pytest.raises(SampleFolderError, match='000004.png is missing'):
        with SampleSetNpz(str(folder), 9, 32, 32) as npz:
            npz.close(manifest)
    assert not [n for n in listing(tmp_path) if '.tmp-' in n], 'the failed npz left no temporary file'


# ------------------------------------------------------------------ sample.py
def test_the_export_is_byte_identical_to_inline_pngs_and_packing_the_folder(tiny_ckpts, exported, tmp_path):
    out, res = exported
    assert 'written as the images were made (0 read back from their PNGs)' in res.stdout + res.stderr
    inline = tmp_path / 'inline'   # today's path: each PNG encoded in the sampling process, then the folder read back
    run_script(sample_flags(tiny_ckpts, inline, *SET, '--writers=0', '--no_npz'))
    assert listing(out) == listing(inline) == PNGS + ['manifest.json']
    for n in PNGS:
        assert (out / n).read_bytes() == (inline / n).read_bytes(), n
    packed = tmp_path / 'packed'
    shutil.copytree(out, packed)
    create_npz_from_sample_folder(str(packed), n=15, manifest=json.loads((out / 'manifest.json').read_text()))
    assert npz_members(str(out) + '.npz') == npz_members(str(packed) + '.npz')


def test_a_killed_run_with_writers_resumes_to_the_same_bytes(tiny_ckpts, exported, tmp_path):
    ref, _ = exported
    out = tmp_path / 'killed'
    run_and_kill_after_checkpoint(sample_flags(tiny_ckpts, out, *SET, '--writers=2'), out / '000005.png', kill_at_iter=8)
    assert [n for n in listing(out) if n.endswith('.png')] == PNGS[:8] and not (tmp_path / 'killed.npz').exists(), \
        'the kill lands once the first 8 PNGs are written, before the npz is published'
    res = run_script(sample_flags(tiny_ckpts, out, *SET, '--writers=2'))
    assert 'written as the images were made (8 read back from their PNGs)' in res.stdout + res.stderr
    assert listing(out) == PNGS + ['manifest.json']
    for n in PNGS:
        assert (out / n).read_bytes() == (ref / n).read_bytes(), n
    ours, theirs = npz_members(str(out) + '.npz'), npz_members(str(ref) + '.npz')
    assert [m[0] for m in ours] == ['arr_0.npy', 'manifest.json'] and ours[0] == theirs[0]


def test_a_png_that_cannot_be_written_ends_sample_py_naming_it(tiny_ckpts, exported, tmp_path):
    ref, _ = exported
    out = tmp_path / 'set'
    shutil.copytree(ref, out)
    (out / '000005.png').unlink()
    (out / '000005.png').mkdir()   # a folder where image 5 goes: it is made again, and the rename onto the folder fails
    (out / '000005.png' / 'keep').write_bytes(b'')
    res = run_script(sample_flags(tiny_ckpts, out, *SET, '--writers=2'), check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and errors[0].startswith(f'error: cannot write {out / "000005.png"}: IsADirectoryError'), res.stderr[-3000:]
    assert not (tmp_path / 'set.npz').exists() and not [n for n in listing(out) if '.tmp-' in n]
    assert [n for n in listing(out) if n.endswith('.png')] == PNGS


def test_writers_flag_is_checked_first(tmp_path):
    from sample import main, parse_sample_args
    from utils.arg_util import FlagError
    with pytest.raises(FlagError, match=r'--writers=-2: use 0 \(write in the sampling process\)'):
        main(parse_sample_args([f'--var_ckpt={tmp_path / "absent.pth"}', f'--out={tmp_path / "s"}', '--writers=-2']))


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_writer_count_for_the_device(device, monkeypatch):
    from sample import SampleArgs, writer_count
    assert writer_count(SampleArgs(writers=3), torch.device(device)) == 3
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(16)), raising=False)
    assert writer_count(SampleArgs(), torch.device(device)) == (0 if device == 'cpu' else 8)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '8')
    assert writer_count(SampleArgs(), torch.device(device)) == (0 if device == 'cpu' else 1)
