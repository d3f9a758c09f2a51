"""Bad input gets a ValueError or CheckpointMismatchError that names what was given and what is allowed."""
import re

import pytest
import torch

from conftest import build_tiny
from models import CheckpointMismatchError, build_vae_var, make_edit_mask
from models.config import PUBLISHED_VAE, published_build_kwargs


@pytest.fixture(scope='module')
def models():
    return build_tiny()


def test_state_dict_missing_unexpected_and_wrong_shapes_are_listed(models):
    _, var = models
    sd = dict(var.state_dict())
    del sd['head.bias']
    sd['blocks.0.attn.mystery'] = torch.zeros(3)
    sd['word_embed.weight'] = torch.zeros(7, 7)
    with pytest.raises(CheckpointMismatchError) as e:
        var.load_state_dict(sd)
    msg = str(e.value)
    assert 'missing keys (1)' in msg and 'head.bias' in msg
    assert 'unexpected keys (1)' in msg and 'blocks.0.attn.mystery' in msg
    assert 'wrong shapes (1)' in msg and 'word_embed.weight: checkpoint [7, 7], model [128, 8]' in msg


def test_state_dict_of_a_published_size_is_recognised(models):
    _, var = models
    _, d20 = build_vae_var(device='meta', **published_build_kwargs('var_d20.pth'))
    sd = {k: torch.empty(0).new_empty(v.shape, device='meta') for k, v in d20.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r'published var_d20\.pth: build with build_vae_var\(.*depth=20'):
        var.load_state_dict(sd)


def test_vae_state_dict_of_the_published_tokenizer_is_recognised(models):
    vae, _ = models
    big, _ = build_vae_var(device='meta', depth=4, patch_nums=(1, 2, 3))  # other scales: ema_vocab_hit_SV differs too
    with pytest.raises(CheckpointMismatchError, match=f'published {re.escape(PUBLISHED_VAE)}'):
        vae.load_state_dict(big.state_dict())


def test_trainer_checkpoint_and_ddp_prefix_get_a_hint(models):
    _, var = models
    with pytest.raises(CheckpointMismatchError, match=r"ckpt\['trainer'\]\['var_wo_ddp'\]"):
        var.load_state_dict({'epoch': 1, 'iter': 2, 'trainer': {}, 'args': {}})
    with pytest.raises(CheckpointMismatchError, match=r"'module\.'"):
        var.load_state_dict({f'module.{k}': v for k, v in var.state_dict().items()})


def test_usage_statistics_of_another_number_of_scales_still_load():
    vae, _ = build_tiny()
    other, _ = build_tiny(seed=3, patch_nums=(1, 2, 4))
    sd = other.state_dict()
    assert sd['quantize.ema_vocab_hit_SV'].shape[0] == 3 != vae.quantize.ema_vocab_hit_SV.shape[0]
    vae.load_state_dict(sd, strict=True)
    assert torch.equal(vae.quantize.embedding.weight, other.quantize.embedding.weight)
    assert vae.quantize.ema_vocab_hit_SV.shape == (4, 64)


@pytest.mark.parametrize('kwargs, pattern', [
    (dict(top_k=65), r'top_k=65 .* from 1 to the vocabulary size 64'),
    (dict(top_k=-1), r'top_k=-1'),
    (dict(top_p=1.5), r'top_p=1\.5 is outside \[0, 1\]'),
    (dict(top_p=-0.1), r'top_p=-0\.1 is outside \[0, 1\]'),
    (dict(B=0), r'B \(batch size\) must be an integer >= 1, got 0'),
    (dict(label_B=6), r'label_B=6 is outside \[0, 5\]'),
    (dict(label_B=torch.tensor([0, 7])), r'labels must be in \[0, 5\].*got values from 0 to 7'),
    (dict(label_B=torch.tensor([-1, 2])), r'labels must be in \[0, 5\].*got values from -1 to 2'),
    (dict(label_B=torch.tensor([1, 2, 3])), r'label_B must be None, an int or 2 integer labels'),
])
def test_sampling_arguments_are_checked(models, kwargs, pattern):
    _, var = models
    args = dict(B=2, label_B=None, g_seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        var.autoregressive_infer_cfg(**args)


def test_boundary_values_are_allowed(models):
    _, var = models
    for kw in (dict(top_k=64, top_p=1.0), dict(top_k=0, top_p=0.0), dict(label_B=5), dict(label_B=-1), dict(label_B=[0, 5])):
        args = dict(B=2, label_B=None, g_seed=0)
        args.update(kw)
        out = var.autoregressive_infer_cfg(**args)
        assert out.shape == (2, 3, 64, 64) and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize('shape', [(1, 3, 48, 48), (1, 3, 64, 32), (1, 1, 64, 64), (3, 64, 64)])
def test_images_the_scales_cannot_tokenise(models, shape):
    vae, _ = models
    with pytest.raises(ValueError, match=r'cannot tokenise images of shape .* must be \(B, 3, 64, 64\)'):
        vae.img_to_idxBl(torch.zeros(shape))
    with pytest.raises(ValueError, match=r'must be \(B, 3, 64, 64\)'):
        vae.img_to_reconstructed_img(torch.zeros(shape))


def test_editing_arguments_are_checked(models):
    vae, var = models
    idx = vae.img_to_idxBl(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match='needs both'):
        var.autoregressive_infer_cfg(B=2, label_B=0, input_img_tokens=idx)
    with pytest.raises(ValueError, match=r'input_img_tokens has 3 token maps, the model has 4 scales'):
        var.autoregressive_infer_cfg(B=2, label_B=0, input_img_tokens=idx[:3], edit_mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match=r'edit_mask must be \(h, w\)'):
        var.autoregressive_infer_cfg(B=2, label_B=0, input_img_tokens=idx, edit_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"edit mode 'paint'"):
        make_edit_mask((0, 0, 1, 1), 'paint', (4, 4))
    with pytest.raises(ValueError, match=r'0 <= y0 < y1 <= 1'):
        make_edit_mask((0.5, 0, 0.2, 1), 'inpaint', (4, 4))
    with pytest.raises(ValueError, match='covers no cell'):
        make_edit_mask((0.5, 0.5, 0.55, 0.55), 'inpaint', (4, 4))
