"""Typed model configs (models/config.py): published presets, builders, JSON and CLI round trips, checkpoints old and new."""
import dataclasses
import inspect
import json

import numpy as np
import pytest
import torch

from conftest import TINY, TINY_TRAIN_FLAGS, build_tiny, reference_file, run_script
from models import VAR, VQVAE, build_vae_var, build_var, build_vqvae
from models.config import (PATCH_NUMS_256, PATCH_NUMS_512, PUBLISHED, PUBLISHED_DEPTHS, PUBLISHED_VAE, VAE_VAR_KWARGS, VAE_VAR_RUNTIME_KWARGS,
                           VAR_BUILD_ARGS, VQVAE_BUILD_ARGS, ConfigError, VARConfig, VQVAEConfig, configs_from_dict, configs_from_vae_var_kwargs,
                           configs_to_dict, published_build_kwargs, published_configs, var_build_args, var_config_from_build_args,
                           vae_var_kwargs, vqvae_build_args, vqvae_config_from_build_args)
from utils.arg_util import (FlagError, ModelFlags, flags_from_var_config, flags_from_vqvae_config, parse_args, parse_dataclass,
                            parse_extract_args, parse_vae_args, var_config_from_flags, vqvae_config_from_flags)

TINY_VQVAE = VQVAEConfig(V=TINY['V'], Cvae=TINY['Cvae'], ch=TINY['ch'], share_quant_resi=TINY['share_quant_resi'], patch_nums=TINY['patch_nums'])
TINY_VAR = VARConfig(depth=TINY['depth'], num_classes=TINY['num_classes'], patch_nums=TINY['patch_nums'])


def shapes(module):
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


# ------------------------------------------------------------------ presets
@pytest.fixture(scope='module')
def manifest():
    return json.loads(reference_file('checkpoints.json').read_text())


def test_presets_are_the_published_builds(manifest):
    tok = manifest[PUBLISHED_VAE]['__build__']
    assert dataclasses.asdict(VQVAEConfig()) == dict(V=tok['V'], Cvae=tok['Cvae'], ch=tok['ch'], share_quant_resi=tok['share_quant_resi'],
                                                     quant_resi=0.5, using_znorm=False, patch_nums=PATCH_NUMS_256)
    assert [f'var_d{d}.pth' for d in PUBLISHED_DEPTHS] == [f for f in manifest if f.startswith('var_')] == [f for f in PUBLISHED if f.startswith('var_')]
    for d in PUBLISHED_DEPTHS:
        build = manifest[f'var_d{d}.pth']['__build__']
        cfg = VARConfig.published(d)
        assert (cfg.depth, cfg.shared_aln, list(cfg.patch_nums), cfg.num_classes, cfg.attn_l2_norm) == (
            build['depth'], build['shared_aln'], build['patch_nums'], 1000, True)
    assert VARConfig.published(36).patch_nums == PATCH_NUMS_512 == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    assert PATCH_NUMS_256 == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    with pytest.raises(ConfigError, match=r'no published VAR of depth 18: the published depths are \[16, 20, 24, 30, 36\]'):
        VARConfig.published(18)


@pytest.mark.parametrize('filename', ['vae_ch160v4096z32.pth', 'var_d16.pth', 'var_d36.pth'])
def test_builders_give_the_layout_of_build_vae_var_and_the_published_parameter_count(manifest, filename):
    vqvae_cfg, var_cfg = published_configs(filename)
    vae = build_vqvae(vqvae_cfg, 'meta')
    var = build_var(var_cfg, vae)
    assert all(p.device.type == 'meta' for p in list(vae.parameters()) + list(var.parameters()))
    ref_vae, ref_var = build_vae_var(device='meta', **published_build_kwargs(filename))
    assert shapes(vae) == shapes(ref_vae) and shapes(var) == shapes(ref_var)
    model = vae if PUBLISHED[filename].kind == 'vae' else var
    assert sum(p.numel() for p in model.parameters()) == manifest[filename]['__build__']['params']


def test_published_table_is_the_one_list_of_files_and_depths():
    assert list(PUBLISHED) == [PUBLISHED_VAE] + [f'var_d{d}.pth' for d in PUBLISHED_DEPTHS]
    assert PUBLISHED_DEPTHS == (16, 20, 24, 30, 36)
    assert [p.kind for p in PUBLISHED.values()] == ['vae'] + ['var'] * 5
    for name, p in PUBLISHED.items():
        assert p.filename == name and p.vqvae.patch_nums == p.var.patch_nums and published_configs(name) == (p.vqvae, p.var)
    assert PUBLISHED['var_d36.pth'].var == VARConfig.published(36) == VARConfig(depth=36, shared_aln=True, patch_nums=PATCH_NUMS_512)


@pytest.mark.parametrize('vqvae, var', [(TINY_VQVAE, TINY_VAR), *(published_configs(f) for f in PUBLISHED),
                                        (VQVAEConfig(quant_resi=0.25, using_znorm=True), VARConfig(attn_l2_norm=False, num_classes=7))])
def test_each_external_form_maps_to_the_configs_and_back(vqvae, var):
    """The classes' build arguments (a saved folder's config.json) and build_vae_var's keywords: one table each, both ways."""
    assert vqvae_config_from_build_args(vqvae_build_args(vqvae)) == vqvae
    assert var_config_from_build_args(var_build_args(var)) == var
    if (vqvae.quant_resi, vqvae.using_znorm) == (0.5, False):
        assert configs_from_vae_var_kwargs(vae_var_kwargs(vqvae, var)) == (vqvae, var)
    else:
        with pytest.raises(ConfigError, match='build it with build_vqvae'):
            vae_var_kwargs(vqvae, var)


def test_the_tables_name_the_builders_arguments():
    vqvae_params, var_params = inspect.signature(VQVAE.__init__).parameters, inspect.signature(VAR.__init__).parameters
    assert set(VQVAE_BUILD_ARGS.values()) <= set(vqvae_params) and set(var_build_args(VARConfig())) <= set(var_params)
    assert set(VQVAE_BUILD_ARGS) == {f.name for f in dataclasses.fields(VQVAEConfig)}
    assert set(VAR_BUILD_ARGS) == {f.name for f in dataclasses.fields(VARConfig)}
    builder = inspect.signature(build_vae_var).parameters
    assert list(builder) == ['device', *VAE_VAR_KWARGS, *VAE_VAR_RUNTIME_KWARGS]
    assert {k: builder[k].default for k in VAE_VAR_KWARGS} == vae_var_kwargs(VQVAEConfig(), VARConfig())   # the same defaults
    with pytest.raises(ConfigError, match='embed_dim: not build_vae_var keywords'):
        configs_from_vae_var_kwargs({'embed_dim': 64})
    with pytest.raises(ConfigError, match=r"VQVAEConfig: the build arguments lack \['v_patch_nums'\]"):
        vqvae_config_from_build_args({k: v for k, v in vqvae_build_args(VQVAEConfig()).items() if k != 'v_patch_nums'})


def test_builders_draw_the_same_weights_as_build_vae_var():
    torch.manual_seed(3)
    ref_vae, ref_var = build_vae_var(device='cpu', flash_if_available=False, fused_if_available=False, **TINY)
    torch.manual_seed(3)
    vae = build_vqvae(TINY_VQVAE, 'cpu')
    var = build_var(TINY_VAR, vae, flash_if_available=False, fused_if_available=False)
    for mine, ref in ((vae, ref_vae), (var, ref_var)):
        a, b = mine.state_dict(), ref.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())   # test_mode: frozen, as build_vae_var's
    with pytest.raises(ConfigError, match=r"VARConfig.patch_nums=\(1, 2, 3\) differ from the tokenizer's \(1, 2, 3, 4\)"):
        build_var(dataclasses.replace(TINY_VAR, patch_nums=(1, 2, 3)), vae)


# ------------------------------------------------------------------ JSON
@pytest.mark.parametrize('cfg', [VQVAEConfig(), VARConfig.published(36), TINY_VAR,
                                 VQVAEConfig(V=64, Cvae=8, ch=64, share_quant_resi=0, quant_resi=-0.25, using_znorm=True, patch_nums=(1, 3))],
                         ids=['vqvae', 'd36', 'tiny', 'vqvae-all-changed'])
def test_json_round_trip(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d == cfg.to_dict() and list(d) == [f.name for f in dataclasses.fields(cfg)]
    assert type(cfg).from_dict(d) == cfg
    both = json.loads(json.dumps(configs_to_dict(TINY_VQVAE, TINY_VAR)))
    assert configs_from_dict(both) == (TINY_VQVAE, TINY_VAR)


@pytest.mark.parametrize('d, message', [
    ({**VARConfig().to_dict(), 'n_layer': 12}, "VARConfig: unknown keys ['n_layer']; its keys are ['depth', 'num_classes', 'shared_aln'"),
    ({k: v for k, v in VARConfig().to_dict().items() if k != 'depth'}, "VARConfig: missing keys ['depth']"),
    ({**VARConfig().to_dict(), 'depth': '16'}, "VARConfig.depth='16' must be int"),
    ({**VARConfig().to_dict(), 'shared_aln': 1}, 'VARConfig.shared_aln=1 must be bool'),
    ({**VARConfig().to_dict(), 'depth': 0}, 'VARConfig.depth=0: must be >= 1'),
    ({**VARConfig().to_dict(), 'patch_nums': [1, 4, 2]}, 'VARConfig.patch_nums=[1, 4, 2] must list increasing positive integer sides'),
])
def test_from_dict_refuses_unknown_missing_and_wrong_values(d, message):
    with pytest.raises(ConfigError) as e:
        VARConfig.from_dict(d)
    assert message in str(e.value)


def test_vqvae_values_are_checked_and_model_config_keys_are_strict():
    with pytest.raises(ConfigError, match=r'VQVAEConfig.ch=48: must be a positive multiple of 32'):
        VQVAEConfig(ch=48)
    with pytest.raises(ConfigError, match=r"VQVAEConfig: unknown keys \['vocab_size'\]"):
        VQVAEConfig.from_dict({**VQVAEConfig().to_dict(), 'vocab_size': 4096})
    with pytest.raises(ConfigError, match=r"model_config must have exactly the keys \['var', 'vqvae'\], got \['vae', 'var', 'vqvae'\]"):
        configs_from_dict({**configs_to_dict(VQVAEConfig(), VARConfig()), 'vae': {}})


# ------------------------------------------------------------------ CLI
def test_train_flags_to_configs_and_back():
    args = parse_args(TINY_TRAIN_FLAGS + ['--saln=1', '--anorm=0', '--num_classes=5', '--share_quant_resi=2']).finalize(1)
    vqvae, var = vqvae_config_from_flags(args), var_config_from_flags(args)
    assert vqvae == VQVAEConfig(V=64, Cvae=8, ch=32, share_quant_resi=2, patch_nums=(1, 2, 3, 4))
    assert var == VARConfig(depth=2, num_classes=5, shared_aln=True, attn_l2_norm=False, patch_nums=(1, 2, 3, 4))
    flags = {**flags_from_vqvae_config(vqvae), **flags_from_var_config(var)}
    assert flags == dict(vocab_size=64, z_channels=8, vae_ch=32, share_quant_resi=2, quant_resi=0.5, using_znorm=False, pn='1_2_3_4',
                         depth=2, num_classes=5, saln=True, anorm=False)
    train_flags = {k: v for k, v in flags.items() if k not in ('quant_resi', 'using_znorm')}   # train.py's tokenizer is the published kind
    assert all(getattr(args, k) == v for k, v in train_flags.items())
    again = parse_args([f'--{k}={v}' for k, v in train_flags.items()]).finalize(1)
    assert (vqvae_config_from_flags(again), var_config_from_flags(again)) == (vqvae, var)
    assert args.model_config() == configs_to_dict(vqvae, var)


def test_tokenizer_flags_to_config_and_back():
    args = parse_vae_args(['--vocab_size=128', '--z_channels=16', '--vae_ch=64', '--quant_resi=0.25', '--using_znorm=1', '--pn=256']).finalize(1)
    cfg = vqvae_config_from_flags(args)
    assert cfg == VQVAEConfig(V=128, Cvae=16, ch=64, quant_resi=0.25, using_znorm=True, patch_nums=PATCH_NUMS_256)
    flags = flags_from_vqvae_config(cfg)
    assert vqvae_config_from_flags(parse_vae_args([f'--{k}={v}' for k, v in flags.items()]).finalize(1)) == cfg
    extract = parse_extract_args([f'--{k}={v}' for k, v in flags.items() if k not in ('quant_resi', 'using_znorm')]).finalize(1)
    assert vqvae_config_from_flags(extract) == dataclasses.replace(cfg, quant_resi=0.5, using_znorm=False)


def test_sampling_flags_follow_the_published_model_of_the_depth():
    assert var_config_from_flags(ModelFlags(depth=36)) == VARConfig.published(36)
    assert vqvae_config_from_flags(ModelFlags(depth=36)) == VQVAEConfig(patch_nums=PATCH_NUMS_512)
    assert var_config_from_flags(ModelFlags(depth=20)) == VARConfig.published(20)
    assert var_config_from_flags(ModelFlags(depth=36, pn='256', saln=False)) == VARConfig(depth=36)
    assert var_config_from_flags(ModelFlags(depth=3)) == VARConfig(depth=3)
    flags = parse_dataclass(ModelFlags, [f'--{k}={v}' for k, v in flags_from_var_config(TINY_VAR).items()])
    assert var_config_from_flags(flags) == TINY_VAR


@pytest.mark.parametrize('argv, message', [(['--depth=0'], '--depth=0: must be >= 1'),
                                           (['--vae_ch=48'], '--vae_ch=48: must be a positive multiple of 32'),
                                           (['--pn=1_3_2'], "--pn='1_3_2' must list increasing positive sides")])
def test_bad_model_flags_are_named_by_their_flag(argv, message):
    flags = parse_dataclass(ModelFlags, argv)
    with pytest.raises(FlagError) as e:
        vqvae_config_from_flags(flags), var_config_from_flags(flags)
    assert message in str(e.value)


# ------------------------------------------------------------------ checkpoints
OLD_ARGS = dict(patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, vae_ch=32, share_quant_resi=4, num_classes=5, depth=2, saln=False, anorm=True)


def trainer_ckpt(vae, var, **layout):
    return {'epoch': 1, 'iter': 0, 'trainer': {'var_wo_ddp': var.state_dict(), 'vae_local': vae.state_dict()}, **layout}


def test_old_and_new_checkpoint_layouts_give_the_same_model(tmp_path):
    from utils.model_loading import read_weights
    vae, var = build_tiny(seed=4)
    torch.save(trainer_ckpt(vae, var, args=OLD_ARGS), tmp_path / 'old.pth')
    # the new layout: the configs define the model, whatever the args say
    torch.save(trainer_ckpt(vae, var, args={}, model_config=configs_to_dict(TINY_VQVAE, TINY_VAR)), tmp_path / 'new.pth')
    old, new = (read_weights(ModelFlags(var_ckpt=str(tmp_path / n))) for n in ('old.pth', 'new.pth'))
    assert (old.vqvae, old.var) == (new.vqvae, new.var) == (TINY_VQVAE, TINY_VAR)
    assert old.kw == new.kw == {**TINY, 'shared_aln': False, 'attn_l2_norm': True}
    bad = configs_to_dict(TINY_VQVAE, TINY_VAR)
    bad['var']['n_embd'] = 64
    torch.save(trainer_ckpt(vae, var, args=OLD_ARGS, model_config=bad), tmp_path / 'bad.pth')
    with pytest.raises(Exception) as e:
        read_weights(ModelFlags(var_ckpt=str(tmp_path / 'bad.pth')))
    assert type(e.value).__name__ == 'UserError' and f"{tmp_path / 'bad.pth'}: its model configuration cannot build a model: " \
        "VARConfig: unknown keys ['n_embd']" in str(e.value)


def test_a_checkpoint_of_the_old_layout_samples(tmp_path):
    vae, var = build_tiny(seed=4)
    torch.save(trainer_ckpt(vae, var, args=OLD_ARGS), tmp_path / 'ar-ckpt-last.pth')
    run_script(['sample.py', f'--var_ckpt={tmp_path / "ar-ckpt-last.pth"}', '--per_class=1', '--num_classes=2', '--top_k=20',
                f'--out={tmp_path / "s"}'])
    assert np.load(str(tmp_path / 's') + '.npz')['arr_0'].shape == (2, 64, 64, 3)


def test_train_py_stores_the_model_config(tiny_shapes, tiny_vae_ckpt, tmp_path):
    run_script(['train.py', f'--data_path={tiny_shapes}', f'--vae_ckpt={tiny_vae_ckpt}', f'--local_out_dir_path={tmp_path}',
                *TINY_TRAIN_FLAGS, '--bs=12', '--ep=1', '--seed=0'])
    ck = torch.load(tmp_path / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert configs_from_dict(ck['model_config']) == (TINY_VQVAE, dataclasses.replace(TINY_VAR, num_classes=6))   # 6 class folders
