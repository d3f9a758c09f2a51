"""save_pretrained / from_pretrained / push_to_hub (safetensors + config.json), the published layout, clear errors offline."""
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, TINY_TRAIN_FLAGS, build_tiny, run_script, script_env
from models.config import HF_REPO, PUBLISHED_VAE, published_var_file

TINY_BUILD = dict(TINY, flash_if_available=False, fused_if_available=False)   # build_vae_var arguments of the tiny models


def outputs(vae, var):
    """Teacher-forced logits on real token maps, and a seeded sample: what a loaded model must reproduce bit for bit."""
    g = torch.Generator().manual_seed(0)
    img_B3HW = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    x_BLCv = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(img_B3HW))
    torch.manual_seed(1)   # condition dropout draws from the global generator
    logits_BLV = var(torch.tensor([0, 3]), x_BLCv)
    img = var.autoregressive_infer_cfg(B=2, label_B=[0, 3], g_seed=[5, 6], cfg=1.5, top_k=10, top_p=0.9)
    return logits_BLV, img


def assert_same_outputs(a, b):
    """a: (tokenizer, VAR) or their outputs() already computed; b: (tokenizer, VAR)."""
    for x, y in zip(a if isinstance(a[0], torch.Tensor) else outputs(*a), outputs(*b)):
        assert torch.equal(x, y)


@pytest.fixture(scope='module')
def trained(shapes_data, tiny_vae_ckpt, tmp_path_factory):
    """A tiny VAR trained by train.py (2 epochs, EMA) that writes its final model with save_pretrained."""
    out = tmp_path_factory.mktemp('trained')
    run_script(['train.py', f'--data_path={shapes_data}', f'--vae_ckpt={tiny_vae_ckpt}', f'--local_out_dir_path={out}', *TINY_TRAIN_FLAGS,
                '--bs=8', '--ep=2', '--ema=0.9', '--seed=3', '--tblr=3e-3'])
    return out


def test_train_py_final_model_round_trips_bitwise(trained, shapes_data, tmp_path):
    from models import VAR, VQVAE, load_pretrained
    from utils.arg_util import ModelFlags
    from utils.model_loading import load_for_sampling
    folder = trained / 'pretrained'
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'classes.json', 'config.json', 'model.safetensors', 'samples.png', 'vae']
    assert sorted(p.name for p in (folder / 'vae').iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['depth'] == 2 and config['num_classes'] == 6 and config['patch_nums'] == [1, 2, 3, 4]
    card = (folder / 'README.md').read_text()
    for text in ('--ep=2', f'dataset: {shapes_data}', 'epochs: 2', 'EMA', 'L_mean', 'samples.png'):
        assert text in card, text

    # the saved weights are the EMA weights of the last checkpoint, and its tokenizer
    vae_ck, var_ck, _ = load_for_sampling(torch.device('cpu'), ModelFlags(var_ckpt=str(trained / 'ar-ckpt-last.pth'), ema=True, fuse=False))
    vae, var = load_pretrained(str(folder), flash_if_available=False, fused_if_available=False)
    assert isinstance(vae, VQVAE) and isinstance(var, VAR) and not var.training and not vae.training
    for a, b in ((var_ck, var), (vae_ck, vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    expected = outputs(vae_ck, var_ck)
    assert_same_outputs(expected, (vae, var))

    # the class names: the data's class folders, id = position, from the checkpoint and the folder alike
    from utils.toy_data import class_names
    names = sorted(p.name for p in (shapes_data / 'train').iterdir())
    assert names == sorted(class_names(3, 2)) and json.loads((folder / 'classes.json').read_text()) == names
    assert var.class_names == var_ck.class_names == names

    # and again: save_pretrained of a model read from a checkpoint → from_pretrained, names included
    var_ck.save_pretrained(tmp_path / 'again')
    var2 = VAR.from_pretrained(tmp_path / 'again', flash_if_available=False, fused_if_available=False)
    assert_same_outputs(expected, (var2.vae_proxy[0], var2))
    assert var2.class_names == names
    assert torch.equal(VQVAE.from_pretrained(tmp_path / 'again').quantize.embedding.weight, vae_ck.quantize.embedding.weight)


def save_published_layout(folder: Path, vae, var, depth=16):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(vae.state_dict(), folder / PUBLISHED_VAE)
    torch.save(var.state_dict(), folder / published_var_file(depth))


def test_published_layout_from_a_local_folder(tmp_path):
    from models import VAR, VQVAE, PretrainedError, load_pretrained
    vae, var = build_tiny(seed=2)
    save_published_layout(tmp_path / 'pub', vae, var)
    var2 = VAR.from_pretrained(tmp_path / 'pub', depth=16, build_kwargs=TINY_BUILD)
    expected = outputs(vae, var)
    assert_same_outputs(expected, (var2.vae_proxy[0], var2))
    vae3, var3 = load_pretrained(str(tmp_path / 'pub'), depth=16, build_kwargs=TINY_BUILD)
    assert_same_outputs(expected, (vae3, var3))
    vae4 = VQVAE.from_pretrained(tmp_path / 'pub', build_kwargs=TINY_BUILD)
    assert torch.equal(vae4.quantize.embedding.weight, vae.quantize.embedding.weight)

    with pytest.raises(PretrainedError, match='pass depth= one of 16, 20, 24, 30, 36'):
        VAR.from_pretrained(tmp_path / 'pub', build_kwargs=TINY_BUILD)
    with pytest.raises(PretrainedError, match='has no var_d20.pth'):
        VAR.from_pretrained(tmp_path / 'pub', depth=20, build_kwargs=TINY_BUILD)
    with pytest.raises(PretrainedError, match='depth=17: the published VARs have depth 16, 20, 24, 30, 36'):
        VAR.from_pretrained(tmp_path / 'pub', depth=17)
    with pytest.raises(PretrainedError, match='holds neither config.json'):
        VAR.from_pretrained(tmp_path, depth=16)


def test_published_shapes_without_override_give_the_mismatch_error(tmp_path):
    """Tiny files under the published names, built at the published shape: the checkpoint loader's error, naming the keys."""
    from models import VQVAE, CheckpointMismatchError
    vae, var = build_tiny(seed=2)
    save_published_layout(tmp_path, vae, var)
    with pytest.raises(CheckpointMismatchError, match=r'VQVAE:\n  wrong shapes \(\d+\):\n    encoder.conv_in.weight: checkpoint \[32, 3, 3, 3\], model \[160, 3, 3, 3\]'):
        VQVAE.from_pretrained(tmp_path)


def test_wrong_shapes_in_safetensors_give_the_checkpoint_loaders_error(tmp_path):
    from models import VAR, CheckpointMismatchError
    from models.weights import load_weights, save_weights
    vae, var = build_tiny(seed=3)
    var.save_pretrained(tmp_path / 'm')
    _, other = build_tiny(seed=4, num_classes=7)
    save_weights(other.state_dict(), str(tmp_path / 'm' / 'model.safetensors'))   # config.json still says 5 classes
    torch.save(other.state_dict(), tmp_path / 'other.pth')
    with pytest.raises(CheckpointMismatchError) as from_pretrained_error:
        VAR.from_pretrained(tmp_path / 'm')
    with pytest.raises(CheckpointMismatchError) as checkpoint_error:   # today's loader of a .pth state dict
        var.load_state_dict(load_weights(str(tmp_path / 'other.pth')), strict=True)
    assert str(from_pretrained_error.value) == str(checkpoint_error.value)
    assert 'class_emb.weight: checkpoint [8, 128], model [6, 128]' in str(checkpoint_error.value)


def test_saved_folder_errors_are_clear(tmp_path):
    from models import VAR, VQVAE, PretrainedError
    vae, var = build_tiny()
    vae.save_pretrained(tmp_path / 'tok')
    with pytest.raises(PretrainedError, match='holds a tokenizer \\(VQVAE\\), not a VAR'):
        VAR.from_pretrained(tmp_path / 'tok')
    assert torch.equal(VQVAE.from_pretrained(tmp_path / 'tok').quantize.embedding.weight, vae.quantize.embedding.weight)
    var.save_pretrained(tmp_path / 'var')
    with pytest.raises(PretrainedError, match='depth= and build_kwargs= are for the published layout'):
        VAR.from_pretrained(tmp_path / 'var', depth=16)
    with pytest.raises(PretrainedError, match='no_such_arg is not a build argument of VAR'):
        VAR.from_pretrained(tmp_path / 'var', no_such_arg=1)
    (tmp_path / 'var' / 'model.safetensors').unlink()
    with pytest.raises(PretrainedError, match='has no model.safetensors \\(the VAR weights\\)'):
        VAR.from_pretrained(tmp_path / 'var')
    with pytest.raises(PretrainedError, match='is not a folder'):
        VAR.from_pretrained(tmp_path / 'nowhere')


def test_hub_unreachable_names_what_to_fetch(tmp_path):
    """Nothing in the cache and no download allowed: the error names the repo, the file and how to fetch it elsewhere."""
    from models import VAR, VQVAE, load_pretrained
    from models.hub import CheckpointUnavailableError
    with pytest.raises(CheckpointUnavailableError, match=rf'{PUBLISHED_VAE} of the Hugging Face repo {HF_REPO} .*'
                                                         rf'hf download {HF_REPO} {PUBLISHED_VAE}'):
        load_pretrained(16, cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(CheckpointUnavailableError, match='config.json of the Hugging Face repo someone/my-var'):
        VAR.from_pretrained('someone/my-var', cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(CheckpointUnavailableError, match='hf download someone/tok'):
        VQVAE.from_pretrained('someone/tok', cache_dir=str(tmp_path), local_files_only=True)


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    """push_to_hub goes through huggingface_hub's HfApi; its two network calls are replaced by a copy to a local folder."""
    import huggingface_hub
    from models import VAR
    from utils.imgs import make_grid
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(('create_repo', repo_id))
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

    def upload_folder(self, repo_id, folder_path, **kw):
        calls.append(('upload_folder', repo_id))
        shutil.copytree(folder_path, tmp_path / 'hub' / repo_id)
        return 'https://huggingface.co/commit'

    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    vae, var = build_tiny(seed=5)
    grid = make_grid(torch.rand(2, 3, 16, 16), nrow=2)
    var.push_to_hub('me/tiny-var', model_card_kwargs=dict(command='train.py --ep=3', dataset='shapes', epochs=3,
                                                          metrics={'vL_mean': 1.5}, sample_grid=grid))
    assert calls == [('create_repo', 'me/tiny-var'), ('upload_folder', 'me/tiny-var')]
    pushed = tmp_path / 'hub' / 'me' / 'tiny-var'
    card = (pushed / 'README.md').read_text()
    for text in ("load_pretrained('me/tiny-var')", '`train.py --ep=3`', 'dataset: shapes', 'epochs: 3', '| vL_mean | 1.5 |', '](samples.png)'):
        assert text in card, text
    from PIL import Image
    assert (pushed / 'samples.png').is_file() and Image.open(pushed / 'samples.png').size == (grid.shape[1], grid.shape[0])
    var2 = VAR.from_pretrained(pushed)
    assert_same_outputs((vae, var), (var2.vae_proxy[0], var2))


@pytest.mark.parametrize('env', [dict(HF_HUB_OFFLINE='1'), dict(HF_HUB_OFFLINE='0', HF_ENDPOINT='http://127.0.0.1:9')],
                         ids=['offline', 'unreachable'])
def test_push_to_hub_flag_fails_before_training(shapes_data, tiny_vae_ckpt, tmp_path, env):
    out = tmp_path / 'out'
    t0 = time.time()
    res = run_script(['train.py', f'--data_path={shapes_data}', f'--vae_ckpt={tiny_vae_ckpt}', f'--local_out_dir_path={out}',
                      *TINY_TRAIN_FLAGS, '--bs=8', '--ep=1', '--push_to_hub=someone/tiny-var'], check=False, env=script_env(**env))
    assert res.returncode != 0
    err = res.stdout + res.stderr
    assert '--push_to_hub=someone/tiny-var: the Hugging Face Hub cannot be reached or no one is logged in' in err, err[-3000:]
    assert 'HF_TOKEN' in err and 'Traceback' not in err
    assert not (out / 'ar-ckpt-last.pth').exists() and not (out / 'pretrained').exists()
    assert time.time() - t0 < 120


# ---------------------------------------------------------------- sample.py, edit.py and the notebook read a saved folder
TINY_MODEL_FLAGS = ['--depth=2', '--pn=1_2_3_4', '--vocab_size=64', '--z_channels=8', '--vae_ch=32']


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """A folder with the tiny models as .pth files, the tokenizer as .safetensors, and save_pretrained's folder 'pretrained'."""
    from models.weights import save_weights
    d = tmp_path_factory.mktemp('saved')
    vae, var = build_tiny(seed=31)
    torch.save(vae.state_dict(), d / 'vae.pth')
    torch.save(var.state_dict(), d / 'var.pth')
    save_weights(vae.state_dict(), str(d / 'vae.safetensors'))
    var.save_pretrained(d / 'pretrained')
    return d


def sample(out, *weights, check=True):
    return run_script(['sample.py', *weights, f'--out={out}', '--num_classes=5', '--per_class=1', '--top_k=20', '--top_p=0.9'],
                      check=check)


def same_pngs(a: Path, b: Path):
    names = sorted(p.name for p in a.glob('*.png'))
    assert len(names) == 5 and names == sorted(p.name for p in b.glob('*.png'))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.fixture(scope='module')
def pth_set(saved, tmp_path_factory):
    """sample.py's images of the .pth files."""
    out = tmp_path_factory.mktemp('pth_set') / 'pth'
    sample(out, f'--var_ckpt={saved / "var.pth"}', f'--vae_ckpt={saved / "vae.pth"}', *TINY_MODEL_FLAGS)
    return out


def test_sample_py_reads_a_save_pretrained_folder_as_its_pth_files(saved, pth_set, tmp_path):
    sample(tmp_path / 'folder', f'--var_ckpt={saved / "pretrained"}')    # the folder's config.json defines the model
    same_pngs(pth_set, tmp_path / 'folder')
    pth, folder = (json.loads((d / 'manifest.json').read_text()) for d in (pth_set, tmp_path / 'folder'))
    assert folder['pixels'] == pth['pixels']          # same configs, same sha256 of the weights
    assert folder['info']['var_weights'].startswith(str(saved / 'pretrained'))


def test_sample_py_reads_a_safetensors_tokenizer(saved, pth_set, tmp_path):
    sample(tmp_path / 'st', f'--var_ckpt={saved / "var.pth"}', f'--vae_ckpt={saved / "vae.safetensors"}', *TINY_MODEL_FLAGS)
    same_pngs(pth_set, tmp_path / 'st')


def test_sample_py_refuses_flags_that_disagree_with_a_folder_and_unreachable_repos(saved, tmp_path):
    def refused(res, *phrases):
        assert res.returncode != 0 and 'Traceback' not in res.stderr, res.stderr[-3000:]
        for p in phrases:
            assert p in res.stderr, f'{p!r} not in:\n{res.stderr[-3000:]}'
        assert not list(tmp_path.glob('out/*.png'))
    folder = f'--var_ckpt={saved / "pretrained"}'
    refused(sample(tmp_path / 'out', folder, '--depth=3', check=False),
            'save_pretrained folder whose config.json and vae/config.json define the model', '--depth=3 (the checkpoint: 2)')
    refused(sample(tmp_path / 'out', folder, f'--vae_ckpt={saved / "vae.pth"}', check=False), 'drop --vae_ckpt')
    refused(sample(tmp_path / 'out', folder, '--ema=1', check=False), '--ema')
    refused(sample(tmp_path / 'out', f'--var_ckpt={saved}', check=False), 'has no config.json')
    # not a local path: a Hub repo id, which offline names what to fetch
    refused(sample(tmp_path / 'out', '--var_ckpt=someone/var-tiny', check=False),
            'taken as a Hugging Face repo id', 'hf download someone/var-tiny config.json')


def test_edit_py_reads_a_save_pretrained_folder(saved, shapes_data, tmp_path):
    image = next((shapes_data / 'train').glob('*/00003.png'))
    common = ['edit.py', f'--image={image}', '--box=0.25,0.25,0.75,0.75', '--class_id=1', '--cfg=3.0', '--top_k=20', '--top_p=0.95']
    run_script([*common, f'--var_ckpt={saved / "var.pth"}', f'--vae_ckpt={saved / "vae.pth"}', *TINY_MODEL_FLAGS, '--num_classes=5',
                f'--out={tmp_path / "pth.png"}'])
    run_script([*common, f'--var_ckpt={saved / "pretrained"}', f'--out={tmp_path / "folder.png"}'])
    assert (tmp_path / 'pth.png').read_bytes() == (tmp_path / 'folder.png').read_bytes()
    res = run_script([*common, f'--var_ckpt={saved / "pretrained"}', '--vae_ch=64', f'--out={tmp_path / "x.png"}'], check=False)
    assert res.returncode != 0 and 'Traceback' not in res.stderr, res.stderr[-3000:]
    assert '--vae_ch=64 (the checkpoint: 32)' in res.stderr and not (tmp_path / 'x.png').exists()
