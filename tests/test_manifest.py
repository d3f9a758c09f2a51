"""Every published checkpoint's keys, shapes and dtypes (../shared/reference/checkpoints.json), built on the meta device."""
import json

import pytest

from conftest import reference_file
from models import build_vae_var
from models.config import PUBLISHED, published_build_kwargs


@pytest.fixture(scope='module')
def manifest():
    return json.loads(reference_file('checkpoints.json').read_text())


@pytest.mark.parametrize('filename', list(PUBLISHED))
def test_published_state_dict_layout(manifest, filename):
    assert filename in manifest, f'{filename} is not in the manifest'
    entry = dict(manifest[filename])
    build = entry.pop('__build__')
    kind = PUBLISHED[filename].kind
    vae, var = build_vae_var(device='meta', **published_build_kwargs(filename))
    model = vae if kind == 'vae' else var
    assert all(p.device.type == 'meta' for p in model.parameters()), 'a meta build must not allocate memory'
    got = {k: [list(v.shape), str(v.dtype).replace('torch.', '')] for k, v in model.state_dict().items()}
    missing = sorted(set(entry) - set(got))
    extra = sorted(set(got) - set(entry))
    wrong = sorted(k for k in entry if k in got and got[k] != entry[k])
    assert not missing and not extra and not wrong, f'{filename}: missing {missing[:5]}, extra {extra[:5]}, wrong {wrong[:5]}'
    assert list(got) == list(entry), 'the key order differs from the published file'
    assert sum(p.numel() for p in model.parameters()) == build['params']
    if kind == 'var':
        assert model.depth == build['depth'] and tuple(model.patch_nums) == tuple(build['patch_nums'])
        assert (model.shared_ada_lin.__class__.__name__ != 'Identity') == build['shared_aln']


def test_manifest_lists_only_known_files(manifest):
    assert set(manifest) == set(PUBLISHED)
