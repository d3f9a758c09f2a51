"""demo_sample.ipynb executes headless (nbclient) against tiny local checkpoints named by environment variables."""
import json

import nbformat
import torch
from nbclient import NotebookClient
from PIL import Image

from conftest import REPO, build_tiny


def test_notebook_executes_and_shows_a_grid(tmp_path, monkeypatch):
    vae, var = build_tiny(seed=8)
    torch.save(vae.state_dict(), tmp_path / 'vae.pth')
    torch.save(var.state_dict(), tmp_path / 'var.pth')
    env = {'VAR_NB_DEPTH': '2', 'VAR_NB_VAE_CKPT': str(tmp_path / 'vae.pth'), 'VAR_NB_VAR_CKPT': str(tmp_path / 'var.pth'),
           'VAR_NB_BUILD': json.dumps(dict(V=64, Cvae=8, ch=32, patch_nums=[1, 2, 3, 4], num_classes=5)),
           'VAR_NB_CLASS_LABELS': '0,0,1,1,2,2,3,4', 'VAR_NB_SAVE': str(tmp_path / 'grid.png'), 'HF_HUB_OFFLINE': '1',
           'OMP_NUM_THREADS': '1'}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(REPO / 'demo_sample.ipynb', as_version=4)
    NotebookClient(nb, timeout=120, kernel_name='python3', resources={'metadata': {'path': str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    assert not [o for o in outputs if o.get('output_type') == 'error']
    assert any('image/png' in o.get('data', {}) for o in outputs), 'the grid is shown'
    assert any('VAR d2 ready on' in o.get('text', '') for o in outputs)
    grid = Image.open(tmp_path / 'grid.png')
    assert grid.size == (8 * 64, 64)
