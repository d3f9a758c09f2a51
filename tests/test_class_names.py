"""Class names travel with the weights: the published models are ImageNet's 1000, a train.py checkpoint and its
save_pretrained folder record the class folders' names, and sample.py --classes / edit.py --class_id take a class by
id, by name or (sample.py) as 'null', the unconditional label of classifier-free guidance."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN_FLAGS, build_tiny, run_script

NAMES = ['red circle', 'blue circle', 'red hbar', 'golden retriever', 'volcano']   # the 5 classes of the tiny VAR
SAMPLING = ['--top_k=20', '--top_p=0.9', '--cfg=1.5']


@pytest.fixture(scope='module')
def named(tmp_path_factory):
    """(save_pretrained folder of a tiny VAR whose classes have names, its tokenizer, the VAR)."""
    vae, var = build_tiny(fast=True, seed=41)   # converted, as sample.py runs it
    var.class_names = list(NAMES)
    folder = tmp_path_factory.mktemp('named') / 'model'
    var.save_pretrained(folder)
    return folder, vae, var


@pytest.fixture(scope='module')
def trained(shapes_data, tiny_vae_ckpt, tmp_path_factory):
    """A tiny train.py run on the built-in dataset (1 epoch), with its final save_pretrained folder."""
    out = tmp_path_factory.mktemp('trained')
    run_script(['train.py', f'--data_path={shapes_data}', f'--vae_ckpt={tiny_vae_ckpt}', f'--local_out_dir_path={out}',
                *TINY_TRAIN_FLAGS, '--bs=8', '--ep=1', '--seed=1', '--vis_every_ep=-1'])
    return out


def sample(out, *flags, check=True):
    return run_script(['sample.py', f'--out={out}', *SAMPLING, *flags], check=check)


def expected_images(var, labels, per_class, seed=0):
    """uint8 (N, H, W, 3) of sample.py's rule with listed classes, in-process: image i has label labels[i // per_class]
    and its generator seeded by image_seed(seed, i)."""
    from sample import image_seed
    from utils.imgs import to_uint8_BHW3
    n = len(labels) * per_class
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the scripts run (OMP_NUM_THREADS=1)
    try:
        with torch.inference_mode():
            img = var.autoregressive_infer_cfg(B=n, label_B=torch.tensor([labels[i // per_class] for i in range(n)]),
                                               g_seed=[image_seed(seed, i) for i in range(n)], cfg=1.5, top_k=20, top_p=0.9)
    finally:
        torch.set_num_threads(threads)
    return to_uint8_BHW3(img)


def one_line_error(res, *phrases):
    assert res.returncode == 1 and 'Traceback' not in res.stderr, res.stderr[-3000:]
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    for p in phrases:
        assert p in res.stderr, f'{p!r} not in {res.stderr!r}'


# ------------------------------------------------------------------ where the names come from
def test_the_published_models_have_the_1000_imagenet_names():
    from models.pretrained import class_names
    from utils.class_names import class_names_for, parse_class
    names = class_names(16)
    assert len(names) == 1000 and names[0] == 'tench' and names[207] == 'golden retriever' and names[980] == 'volcano'
    for source in ('d36', 'FoundationVision/var', 'some/folder/var_d20.pth'):
        assert class_names(source) == names, source
    assert class_names('var.pth') is None and class_names(12) is None   # a file of another name, no published depth
    assert class_names_for('var_d30.pth', 1000) == names
    assert class_names_for('var_d16.pth', 5) is None        # a 5-class model under the published name: not ImageNet's classes
    assert parse_class('Golden_Retriever', 1000, names) == 207 and parse_class('volcano', 1000, names) == 980


def test_save_pretrained_writes_classes_json_and_from_pretrained_reads_it(named, tmp_path):
    from models import VAR
    from models.pretrained import PretrainedError, class_names
    folder, _, var = named
    assert json.loads((folder / 'classes.json').read_text()) == NAMES
    assert class_names(str(folder)) == NAMES
    assert VAR.from_pretrained(folder, flash_if_available=False, fused_if_available=False).class_names == NAMES
    # a model without names saved over the folder leaves no stale classes.json
    _, unnamed = build_tiny(seed=41)
    unnamed.save_pretrained(folder.parent / 'again')
    unnamed.class_names = list(NAMES)
    unnamed.save_pretrained(tmp_path / 'm')
    unnamed.class_names = None
    unnamed.save_pretrained(tmp_path / 'm')
    assert not (folder.parent / 'again' / 'classes.json').exists() and not (tmp_path / 'm' / 'classes.json').exists()
    assert VAR.from_pretrained(tmp_path / 'm').class_names is None
    unnamed.class_names = NAMES + ['sixth']   # more names than the model has classes: refused before anything is written
    with pytest.raises(PretrainedError, match='6 names for a model of 5 classes'):
        unnamed.save_pretrained(tmp_path / 'bad')
    assert not (tmp_path / 'bad' / 'model.safetensors').exists()


def test_a_train_py_checkpoint_and_its_final_folder_record_the_class_folders(trained, shapes_data):
    from utils.class_names import class_names_for
    names = sorted(p.name for p in (shapes_data / 'train').iterdir())
    ck = torch.load(trained / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert ck['class_names'] == names
    assert json.loads((trained / 'pretrained' / 'classes.json').read_text()) == names
    assert class_names_for(str(trained / 'ar-ckpt-last.pth')) == class_names_for(str(trained / 'pretrained')) == names


def test_resuming_on_other_class_folders_is_refused(trained, shapes_data, tiny_vae_ckpt, tmp_path):
    import shutil
    names = sorted(p.name for p in (shapes_data / 'train').iterdir())
    data, out = tmp_path / 'data', tmp_path / 'run'
    shutil.copytree(shapes_data, data)
    shutil.copytree(trained, out)
    for split in ('train', 'val'):   # the same images, a class renamed so that it sorts last: ids 1 .. 5 move
        (data / split / names[1]).rename(data / split / f'z_{names[1]}')
    res = run_script(['train.py', f'--data_path={data}', f'--vae_ckpt={tiny_vae_ckpt}', f'--local_out_dir_path={out}',
                      *TINY_TRAIN_FLAGS, '--bs=8', '--ep=2', '--seed=1', '--vis_every_ep=-1'], check=False)
    one_line_error(res, f'{out / "ar-ckpt-last.pth"} was trained on other classes than --data_path={data} has now',
                   f"class 1: '{names[1]}' then, '{names[2]}' now")
    assert torch.load(out / 'ar-ckpt-last.pth', weights_only=True)['epoch'] == 1


def test_sample_py_takes_classes_of_a_train_py_checkpoint_by_name(trained, shapes_data, tmp_path):
    names = sorted(p.name for p in (shapes_data / 'train').iterdir())
    res = sample(tmp_path / 's', f'--var_ckpt={trained / "ar-ckpt-last.pth"}', f'--classes={names[4]},1', '--per_class=1')
    assert f'sampling 2 classes: 4: {names[4]}, 1: {names[1]}' in res.stdout
    manifest = json.loads((tmp_path / 's' / 'manifest.json').read_text())
    assert manifest['pixels']['classes'] == [4, 1] and manifest['info']['class_names'] == [names[4], names[1]]


# ------------------------------------------------------------------ sample.py --classes
def test_sample_py_classes_by_id_name_and_null(named, tmp_path):
    folder, _, var = named
    res = sample(tmp_path / 's', f'--var_ckpt={folder}', '--classes=4,golden retriever,null', '--per_class=2')
    assert 'sampling 3 classes: 4: volcano, 3: golden retriever, null (unconditional)' in res.stdout
    assert "'null' is the unconditional label 5" in res.stdout and '--cfg=1.5 has no effect' in res.stdout
    want = expected_images(var, [4, 3, 5], per_class=2)   # the null class: autoregressive_infer_cfg with label num_classes
    pngs = np.stack([np.asarray(Image.open(tmp_path / 's' / f'{i:06d}.png')) for i in range(6)])
    assert np.array_equal(pngs, want)
    assert not (tmp_path / 's' / '000006.png').exists()
    with np.load(str(tmp_path / 's') + '.npz') as z:
        assert np.array_equal(z['arr_0'], want)
    m = json.loads((tmp_path / 's' / 'manifest.json').read_text())
    assert m['pixels']['classes'] == [4, 3, 5] and 'num_classes' not in m['pixels']
    assert m['info']['class_names'] == ['volcano', 'golden retriever', None] and m['info']['images'] == 6


def test_a_rerun_with_other_classes_is_refused_naming_classes(named, tmp_path):
    folder, _, _ = named
    out = tmp_path / 's'
    sample(out, f'--var_ckpt={folder}', '--classes=volcano,0', '--per_class=1')
    res = sample(out, f'--var_ckpt={folder}', '--classes=4,red circle', '--per_class=1')   # the same labels: nothing to do
    assert 'holds all 2 images already' in res.stdout
    res = sample(out, f'--var_ckpt={folder}', '--classes=0,4', '--per_class=1', check=False)
    assert res.returncode == 1 and '--classes: [4, 0] then, [0, 4] now' in res.stderr, res.stderr[-2000:]
    res = sample(out, f'--var_ckpt={folder}', '--per_class=1', '--num_classes=2', check=False)
    assert res.returncode == 1 and "--classes: [4, 0] then, '' (every class) now" in res.stderr, res.stderr[-2000:]
    assert 'VAR d2 from' not in res.stdout, 'refused before the weights are read'
    # and a set of every class: its pixel settings as before --classes existed, refused for listed classes
    every = tmp_path / 'every'
    sample(every, f'--var_ckpt={folder}', '--per_class=1', '--num_classes=5')
    m = json.loads((every / 'manifest.json').read_text())
    assert sorted(m['pixels']) == ['cfg', 'device', 'ema', 'format', 'fp16', 'image_size', 'model', 'more_smooth', 'num_classes',
                                   'per_class', 'seed', 'top_k', 'top_p', 'vae_sha256', 'var_sha256']
    assert m['info']['class_names'] == NAMES
    res = sample(every, f'--var_ckpt={folder}', '--per_class=1')   # no --num_classes: every class of the model, the same set
    assert 'holds all 5 images already' in res.stdout, res.stdout[-2000:]
    res = sample(every, f'--var_ckpt={folder}', '--classes=0,1,2,3,4', '--per_class=1', check=False)
    assert res.returncode == 1 and "--classes: '' (every class) then, [0, 1, 2, 3, 4] now" in res.stderr, res.stderr[-2000:]


def test_bad_classes_are_one_line_errors_before_the_model_is_built(named, tmp_path):
    folder, vae, var = named
    res = sample(tmp_path / 's', f'--var_ckpt={folder}', '--classes=3,volcanoo', check=False)
    one_line_error(res, "--classes='volcanoo' is not a class name of these weights; did you mean 4: volcano")
    assert 'VAR d2 from' not in res.stdout and not list(tmp_path.glob('s/*.png'))
    one_line_error(sample(tmp_path / 's', f'--var_ckpt={folder}', '--classes=5', check=False),
                   "--classes=5: the model has 5 classes, ids 0 .. 4, or 'null' for no class")
    # a plain state dict records no names
    torch.save(var.state_dict(), tmp_path / 'var.pth')
    torch.save(vae.state_dict(), tmp_path / 'vae.pth')
    plain = [f'--var_ckpt={tmp_path / "var.pth"}', f'--vae_ckpt={tmp_path / "vae.pth"}', '--depth=2', '--pn=1_2_3_4',
             '--vocab_size=64', '--z_channels=8', '--vae_ch=32']
    one_line_error(sample(tmp_path / 's', *plain, '--classes=volcano', check=False),
                   "--classes='volcano': these weights record no class names; give the class by id (0 .. 4)")
    # checked before any file is read: the weights named here do not exist
    missing = [f'--var_ckpt={tmp_path / "no.pth"}']
    one_line_error(sample(tmp_path / 's', *missing, '--classes=1,,2', check=False), "--classes='1,,2' has an empty item")
    one_line_error(sample(tmp_path / 's', *missing, '--classes=1', '--num_classes=3', check=False),
                   "--num_classes=3 and --classes='1' both choose the classes to sample")


# ------------------------------------------------------------------ edit.py --class_id
def test_edit_py_class_id_by_name(named, shapes_data, tmp_path):
    folder, _, _ = named
    image = next((shapes_data / 'train').glob('*/00003.png'))
    common = ['edit.py', f'--image={image}', '--box=0.25,0.25,0.75,0.75', f'--var_ckpt={folder}', '--cfg=3.0', '--top_k=20']
    res = run_script([*common, '--class_id=golden retriever', f'--out={tmp_path / "name.png"}'])
    assert 'class 3: golden retriever' in res.stdout
    run_script([*common, '--class_id=3', f'--out={tmp_path / "id.png"}'])
    assert (tmp_path / 'name.png').read_bytes() == (tmp_path / 'id.png').read_bytes()
    run_script([*common, '--class_id=2', f'--out={tmp_path / "other.png"}'])
    assert (tmp_path / 'other.png').read_bytes() != (tmp_path / 'id.png').read_bytes()
    res = run_script([*common, '--class_id=golden retreiver', f'--out={tmp_path / "x.png"}'], check=False)
    one_line_error(res, "--class_id='golden retreiver' is not a class name of these weights; did you mean 3: golden retriever")
    assert not (tmp_path / 'x.png').exists()
