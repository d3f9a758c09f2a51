"""extract_tokens.py and train.py --tokens_path: same tokens for any number of processes, resumable, same training as live tokenisation;
a folder made from other images or another tokenizer, a corrupt image and a full disk are clear errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_TRAIN_FLAGS, build_tiny, run_script, script_env
from utils.token_data import TokensError

TOK_FLAGS = ['--vocab_size=64', '--z_channels=8', '--vae_ch=32', '--pn=1_2_3_4']


def extract(data, vae, out, procs=0, *extra, check=True):
    return run_script(['extract_tokens.py', f'--data_path={data}', f'--vae_ckpt={vae}', f'--tokens_path={out}', *TOK_FLAGS, '--bs=5', *extra],
                      torchrun_procs=procs, check=check)


@pytest.fixture(scope='module')
def tokens_one(shapes_data, tiny_vae_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp('tokens') / 'one'
    extract(shapes_data, tiny_vae_ckpt, out, 0, '--mid_reso=1')
    return out


def test_tokens_match_the_tokenizer_and_do_not_depend_on_processes(shapes_data, tiny_vae_ckpt, tokens_one, tmp_path):
    meta = json.loads((tokens_one / 'meta.json').read_text())
    assert meta['n_train'] == 96 and meta['n_val'] == 24 and meta['patch_nums'] == [1, 2, 3, 4] and len(meta['classes']) == 6
    tok = np.load(tokens_one / 'train_tokens.npy')
    assert tok.shape == (96, 2, 30) and tok.dtype == np.uint16 and np.load(tokens_one / 'val_tokens.npy').shape == (24, 1, 30)
    assert np.all(np.load(tokens_one / 'train_done.npy') == 1)
    # row 5 is the tokenizer's output for image 5 and for its flip
    from conftest import build_tiny
    from utils.data import build_dataset
    vae, _ = build_tiny(fast=True, seed=11)
    _, train_set, _, _ = build_dataset(str(shapes_data), final_reso=64, mid_reso=1.0)
    train_set.train = False
    x = train_set[5][0][None]
    with torch.no_grad():
        want = [torch.cat(vae.img_to_idxBl(v), 1)[0].numpy() for v in (x, x.flip(-1))]
    assert np.array_equal(tok[5, 0], want[0]) and np.array_equal(tok[5, 1], want[1])
    assert np.load(tokens_one / 'train_labels.npy')[5] == train_set.samples[5][1]
    # two processes write the same arrays
    two = tmp_path / 'two'
    extract(shapes_data, tiny_vae_ckpt, two, 2, '--mid_reso=1')
    for name in ('train_tokens.npy', 'train_labels.npy', 'val_tokens.npy', 'val_labels.npy'):
        assert np.array_equal(np.load(tokens_one / name), np.load(two / name)), name


def test_an_interrupted_extraction_is_finished_on_rerun(shapes_data, tiny_vae_ckpt, tokens_one, tmp_path):
    import shutil
    out = tmp_path / 'partial'
    shutil.copytree(tokens_one, out)
    (out / 'meta.json').unlink()                       # as if killed before the end
    done = np.load(out / 'train_done.npy', mmap_mode='r+')
    tok = np.load(out / 'train_tokens.npy', mmap_mode='r+')
    done[10:40] = 0
    tok[10:40] = 0                                      # rows never written
    done.flush()
    tok.flush()
    del done, tok
    res = extract(shapes_data, tiny_vae_ckpt, out, 0, '--mid_reso=1')
    assert 'train tokens: 100%' in res.stderr and '30/30' in res.stderr   # only the missing rows
    assert np.array_equal(np.load(out / 'train_tokens.npy'), np.load(tokens_one / 'train_tokens.npy'))
    assert (out / 'meta.json').is_file()
    assert 'complete already' in extract(shapes_data, tiny_vae_ckpt, out, 0, '--mid_reso=1').stdout


def test_training_from_tokens_equals_live_tokenisation(shapes_data, tiny_vae_ckpt, tokens_one, tmp_path):
    common = [f'--vae_ckpt={tiny_vae_ckpt}', *TINY_TRAIN_FLAGS, '--bs=8', '--ep=2', '--hflip=1', '--mid_reso=1', '--seed=4', '--tblr=1e-3']
    run_script(['train.py', f'--data_path={shapes_data}', f'--local_out_dir_path={tmp_path / "live"}', *common])
    res = run_script(['train.py', f'--tokens_path={tokens_one}', f'--local_out_dir_path={tmp_path / "tok"}', *common])
    assert 'training from the token maps' in res.stdout
    a = torch.load(tmp_path / 'live' / 'ar-ckpt-last.pth', weights_only=True)['trainer']['var_wo_ddp']
    b = torch.load(tmp_path / 'tok' / 'ar-ckpt-last.pth', weights_only=True)['trainer']['var_wo_ddp']
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the class names: the sorted class folders (id = position) in meta.json, and in the checkpoints of both runs
    names = sorted(p.name for p in (shapes_data / 'train').iterdir())
    assert json.loads((tokens_one / 'meta.json').read_text())['classes'] == names
    for run in ('live', 'tok'):
        assert torch.load(tmp_path / run / 'ar-ckpt-last.pth', weights_only=True)['class_names'] == names, run
    val = [json.loads(x) for x in (tmp_path / 'tok' / 'log.txt').read_text().splitlines() if '"eval"' in x]
    assert val and val[-1]['val_images'] == 24


def test_tokens_of_another_tokenizer_are_refused(shapes_data, tokens_one, tmp_path):
    from conftest import build_tiny
    other = tmp_path / 'other_vae.pth'
    torch.save(build_tiny(fast=True, seed=99)[0].state_dict(), other)
    res = run_script(['train.py', f'--tokens_path={tokens_one}', f'--vae_ckpt={other}', f'--local_out_dir_path={tmp_path / "x"}',
                      *TINY_TRAIN_FLAGS, '--ep=1'], check=False)
    assert res.returncode == 1 and 'were extracted with another tokenizer' in res.stderr
    res = run_script(['train.py', f'--tokens_path={tmp_path / "nothing"}', f'--vae_ckpt={other}', f'--local_out_dir_path={tmp_path / "y"}',
                      *TINY_TRAIN_FLAGS, '--ep=1'], check=False)
    assert res.returncode == 1 and 'run extract_tokens.py first' in res.stderr


@pytest.fixture(scope='module')
def tiny_tokens(tiny_shapes, tiny_vae_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp('tiny_tokens') / 'tok'
    extract(tiny_shapes, tiny_vae_ckpt, out, 0, '--mid_reso=1')
    return out


def assert_refused(res, folder, finished, *what):
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr
    kind = 'a finished' if finished else 'an unfinished'
    assert f'{folder} holds {kind} extraction made from other inputs: ' in res.stderr, res.stderr
    assert f'Use another --tokens_path, or delete {folder} to start afresh' in res.stderr
    for w in what:
        assert w in res.stderr, res.stderr


def test_a_folder_made_with_another_tokenizer_is_refused_finished_or_not(tiny_shapes, tiny_tokens, tmp_path):
    other = tmp_path / 'other_vae.pth'
    torch.save(build_tiny(fast=True, seed=99)[0].state_dict(), other)
    meta = json.loads((tiny_tokens / 'meta.json').read_text())
    from utils.token_data import tokenizer_fingerprint
    change = f'the tokenizer weights (fingerprint {meta["tokenizer"]} then, {tokenizer_fingerprint(torch.load(other))} now)'
    assert_refused(extract(tiny_shapes, other, tiny_tokens, 0, '--mid_reso=1', check=False), tiny_tokens, True, change)
    assert json.loads((tiny_tokens / 'meta.json').read_text()) == meta
    partial = tmp_path / 'partial'
    shutil.copytree(tiny_tokens, partial)
    (partial / 'meta.json').unlink()
    before = np.load(partial / 'train_tokens.npy')
    assert_refused(extract(tiny_shapes, other, partial, 0, '--mid_reso=1', check=False), partial, False, change)
    assert np.array_equal(np.load(partial / 'train_tokens.npy'), before)


def test_a_folder_made_from_other_images_is_refused_finished_or_not(tiny_shapes, tiny_vae_ckpt, tiny_tokens, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_shapes, data)        # moved, same files (copy2 keeps the modification times): still complete
    tok = tmp_path / 'tok'
    shutil.copytree(tiny_tokens, tok)
    assert 'complete already' in extract(data, tiny_vae_ckpt, tok, 0, '--mid_reso=1').stdout
    assert_refused(extract(data, tiny_vae_ckpt, tok, 0, '--mid_reso=1.125', check=False), tok, True, 'mid_reso (1.0 then, 1.125 now)')
    cls = sorted(os.listdir(data / 'train'))[1]
    victim = data / 'train' / cls / sorted(os.listdir(data / 'train' / cls))[0]
    from PIL import Image
    Image.open(victim).transpose(Image.FLIP_TOP_BOTTOM).save(victim)   # another picture in the same file
    st = os.stat(victim)
    os.utime(victim, (st.st_atime, st.st_mtime + 5))
    assert_refused(extract(data, tiny_vae_ckpt, tok, 0, '--mid_reso=1', check=False), tok, True,
                   f'the train images: 1 class folder ({cls}) with other files, sizes or modification times')
    (tok / 'meta.json').unlink()
    shutil.copy2(victim, data / 'val' / cls / 'extra.png')
    assert_refused(extract(data, tiny_vae_ckpt, tok, 0, '--mid_reso=1', check=False), tok, False,
                   f'the train images: 1 class folder ({cls})', f'the val images: 1 class folder ({cls}) with other files, sizes or '
                   f'modification times (6 files of')


def test_a_corrupt_or_empty_image_is_an_error_naming_it(tiny_shapes, tiny_vae_ckpt, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_shapes, data)
    cls = sorted(os.listdir(data / 'train'))[2]
    victim = data / 'train' / cls / sorted(os.listdir(data / 'train' / cls))[1]
    empty = data / 'val' / cls / sorted(os.listdir(data / 'val' / cls))[0]
    good = empty.read_bytes()
    empty.write_bytes(b'')
    res = extract(data, tiny_vae_ckpt, tmp_path / 'tok', 0, '--mid_reso=1', check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert f'{empty} is an empty file (0 bytes), not an image: replace it or remove it, then rerun' in res.stderr
    empty.write_bytes(good)
    victim.write_bytes(b'not an image at all' * 20)
    res = extract(data, tiny_vae_ckpt, tmp_path / 'tok', 0, '--mid_reso=1', check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr
    assert f'{victim} cannot be read as an image (UnidentifiedImageError' in res.stderr and 'Replace or remove that file' in res.stderr
    assert not (tmp_path / 'tok' / 'meta.json').exists()
    done = np.load(tmp_path / 'tok' / 'train_done.npy')
    assert done.sum() < len(done)    # the extraction stopped; the rows of the images before stay for a resume


def test_a_full_disk_is_a_clear_error_and_leaves_no_array(tiny_shapes, tiny_vae_ckpt, tiny_tokens, tmp_path):
    import resource
    out = tmp_path / 'tok'
    argv = ['extract_tokens.py', f'--data_path={tiny_shapes}', f'--vae_ckpt={tiny_vae_ckpt}', f'--tokens_path={out}', *TOK_FLAGS,
            '--bs=5', '--mid_reso=1']
    limit = 2800   # bytes per file: less than the train token array (24 images x 2 views x 30 tokens x 2 bytes), more than the log

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    res = subprocess.run([sys.executable, *argv], cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300,
                         preexec_fn=small_disk)
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr
    assert f'no room on the disk for {out / "train_tokens.npy"} (2880 bytes: File too large)' in res.stderr
    assert not [p for p in os.listdir(out) if p.endswith(('.npy', '.tmp', '.json'))], os.listdir(out)
    extract(tiny_shapes, tiny_vae_ckpt, out, 0, '--mid_reso=1')   # with room: the whole extraction, as if nothing happened
    for name in ('train_tokens.npy', 'val_tokens.npy', 'train_labels.npy'):
        assert np.array_equal(np.load(out / name), np.load(tiny_tokens / name)), name


# --crops: random crops of every training image stored with their flips, one view drawn per image and epoch
CROP_FLAGS = ['--mid_reso=1.25']   # 80 px resized images: 17 x 17 places for a 64 px crop


@pytest.fixture(scope='module')
def crops_one(tiny_shapes, tiny_vae_ckpt, tmp_path_factory):
    """A folder as extract_tokens.py wrote it before --crops: no flag given."""
    out = tmp_path_factory.mktemp('crops') / 'one'
    extract(tiny_shapes, tiny_vae_ckpt, out, 0, *CROP_FLAGS)
    return out


@pytest.fixture(scope='module')
def crops_three(tiny_shapes, tiny_vae_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp('crops') / 'three'
    extract(tiny_shapes, tiny_vae_ckpt, out, 0, *CROP_FLAGS, '--crops=3', '--seed=7')
    return out


def test_crops_1_writes_the_files_of_no_flag(tiny_shapes, tiny_vae_ckpt, crops_one, tmp_path):
    out = tmp_path / 'flag'
    extract(tiny_shapes, tiny_vae_ckpt, out, 0, *CROP_FLAGS, '--crops=1', '--seed=5')   # the seed draws nothing with one crop
    for name in ('train_tokens.npy', 'train_labels.npy', 'train_done.npy', 'val_tokens.npy', 'val_labels.npy', 'val_done.npy',
                 'train_config.json', 'val_config.json'):
        assert (out / name).read_bytes() == (crops_one / name).read_bytes(), name
    meta, before = (json.loads((d / 'meta.json').read_text()) for d in (out, crops_one))
    for m in (meta, before):
        del m['seconds']
    assert list(meta.items()) == list(before.items()) and 'crops' not in meta and meta['views']['train'] == ['image', 'hflip']


def test_crops_3_stores_the_crops_live_training_draws(tiny_shapes, crops_one, crops_three):
    from utils.data import build_dataset
    tok, one = np.load(crops_three / 'train_tokens.npy'), np.load(crops_one / 'train_tokens.npy')
    assert tok.shape == (24, 6, 30) and np.array_equal(tok[:, :2], one)   # views 0, 1: the centre crop and its flip, as before
    for name in ('val_tokens.npy', 'train_labels.npy', 'val_labels.npy'):
        assert np.array_equal(np.load(crops_three / name), np.load(crops_one / name)), name
    assert not np.array_equal(tok[:, 2], tok[:, 0]) and not np.array_equal(tok[:, 4], tok[:, 2])   # other places than the centre
    meta = json.loads((crops_three / 'meta.json').read_text())
    assert meta['crops'] == 3 and meta['crop_seed'] == 7 and 'sample_seed(crop_seed, c, image index)' in meta['crops_drawn']
    assert meta['views']['train'] == ['image', 'hflip', 'random crop 1', 'random crop 1 hflip', 'random crop 2', 'random crop 2 hflip']
    # crop c of image i: the crop the training transform (no flip, --seed=7) draws at epoch c, tokenised with its flip
    vae, _ = build_tiny(fast=True, seed=11)
    _, train_set, _, _ = build_dataset(str(tiny_shapes), final_reso=64, mid_reso=1.25, hflip=False, seed=7)
    for c, i in ((2, 9), (1, 17)):
        x = train_set[(c, i)][0][None]
        with torch.no_grad():
            want = [torch.cat(vae.img_to_idxBl(v), 1)[0].numpy() for v in (x, x.flip(-1))]
        assert np.array_equal(tok[i, 2 * c], want[0]) and np.array_equal(tok[i, 2 * c + 1], want[1]), (c, i)


def interrupted_copy(folder, dest):
    """A copy of a finished tokens folder as if killed before the end: rows 3..14 of train never written."""
    shutil.copytree(folder, dest)
    (dest / 'meta.json').unlink()
    done, tok = np.load(dest / 'train_done.npy', mmap_mode='r+'), np.load(dest / 'train_tokens.npy', mmap_mode='r+')
    done[3:15], tok[3:15] = 0, 0
    done.flush()
    tok.flush()
    return dest


def test_an_interrupted_crops_extraction_finishes_with_the_same_crops(tiny_shapes, tiny_vae_ckpt, crops_three, tmp_path):
    partial = interrupted_copy(crops_three, tmp_path / 'partial')
    extract(tiny_shapes, tiny_vae_ckpt, partial, 0, *CROP_FLAGS, '--crops=3', '--seed=7', '--bs=4')   # other batches, same crops
    assert np.array_equal(np.load(partial / 'train_tokens.npy'), np.load(crops_three / 'train_tokens.npy'))


def test_another_crops_is_refused(tiny_shapes, tiny_vae_ckpt, crops_one, crops_three, tmp_path):
    import extract_tokens
    partial = interrupted_copy(crops_three, tmp_path / 'partial')
    before = np.load(partial / 'train_tokens.npy')
    res = extract(tiny_shapes, tiny_vae_ckpt, partial, 0, *CROP_FLAGS, '--crops=1', check=False)
    assert_refused(res, partial, False, '--crops (3 then, 1 now; rerun with --crops=3 to finish or reuse this folder)')
    assert len([x for x in res.stderr.splitlines() if '--crops' in x]) == 1
    assert np.array_equal(np.load(partial / 'train_tokens.npy'), before)
    # the other way round: a folder of before --crops refuses --crops=3; another --seed refuses the crops it would draw
    meta = json.loads((crops_one / 'meta.json').read_text())
    with pytest.raises(TokensError, match=r'--crops \(1 then, 3 now; rerun with --crops=1'):
        extract_tokens.check_folder(str(crops_one), {**meta, 'crops': 3, 'crop_seed': 7, 'crops_drawn': extract_tokens.CROPS_DRAWN})
    meta3 = json.loads((crops_three / 'meta.json').read_text())
    with pytest.raises(TokensError, match=r'--seed, which draws the crops \(7 then, 8 now; rerun with --seed=7'):
        extract_tokens.check_folder(str(crops_three), {**meta3, 'crop_seed': 8})
    assert extract_tokens.check_folder(str(crops_one), {k: v for k, v in meta.items() if k not in ('crops', 'seconds')})


def test_the_token_dataset_draws_every_view_reproducibly(crops_one, crops_three):
    from utils.data import sample_seed
    from utils.token_data import build_token_datasets
    n_classes, train, val, _ = build_token_datasets(str(crops_three), (1, 2, 3, 4), hflip=True, seed=3)
    tok = np.load(crops_three / 'train_tokens.npy')
    drawn = [[train.view_of(ep, i) for ep in range(60)] for i in range(len(train))]
    assert all(set(d) == set(range(6)) for d in drawn)   # every crop and flip over the epochs, for every image
    again = build_token_datasets(str(crops_three), (1, 2, 3, 4), hflip=True, seed=3)[1]
    assert [[again.view_of(ep, i) for ep in range(60)] for i in range(len(train))] == drawn
    other = build_token_datasets(str(crops_three), (1, 2, 3, 4), hflip=True, seed=4)[1]
    assert [[other.view_of(ep, i) for ep in range(60)] for i in range(len(train))] != drawn
    x, label = train[(5, 11)]
    assert np.array_equal(x.numpy(), tok[11, drawn[11][5]]) and label == int(np.load(crops_three / 'train_labels.npy')[11])
    no_flip = build_token_datasets(str(crops_three), (1, 2, 3, 4), hflip=False, seed=3)[1]
    assert {no_flip.view_of(ep, i) for ep in range(60) for i in range(len(train))} == {0, 2, 4}
    assert {val.view_of(ep, i) for ep in range(10) for i in range(len(val))} == {0}   # validation: the one centre crop
    # a folder of two views: the flip drawn as before --crops (the generator's first number below 0.5)
    old = build_token_datasets(str(crops_one), (1, 2, 3, 4), hflip=True, seed=3)[1]
    for ep, i in ((0, 0), (3, 7), (9, 23)):
        want = int(torch.rand(1, generator=torch.Generator().manual_seed(sample_seed(3, ep, i))).item() < 0.5)
        assert old.view_of(ep, i) == want


def test_a_folder_of_two_views_still_trains(crops_one, tiny_vae_ckpt, tmp_path):
    res = run_script(['train.py', f'--tokens_path={crops_one}', f'--vae_ckpt={tiny_vae_ckpt}', f'--local_out_dir_path={tmp_path / "o"}',
                      *TINY_TRAIN_FLAGS, '--bs=8', '--ep=1', '--hflip=1', '--seed=4'])
    assert 'training from the token maps' in res.stdout and (tmp_path / 'o' / 'ar-ckpt-last.pth').is_file()
