"""demo_sample.ipynb executes headless (nbclient) against tiny local checkpoints named by environment variables, draws the grid
that the same models give in-process with the reference notebook's settings, and is exactly what tools/make_demo_notebook.py writes."""
import json

import nbformat
import numpy as np
import pytest
import torch
import torchvision
from nbclient import NotebookClient
from PIL import Image

from conftest import REPO, build_tiny, run_script


@pytest.mark.parametrize('layout', ['pth', 'save_pretrained'])
def test_notebook_executes_and_shows_the_grid_of_the_reference_settings(tmp_path, monkeypatch, layout):
    vae, var = build_tiny(fast=True, seed=8)
    torch.save(vae.state_dict(), tmp_path / 'vae.pth')
    torch.save(var.state_dict(), tmp_path / 'var.pth')
    var.class_names = ['tench', 'goldfish', 'great white shark', 'tiger shark', 'hammerhead']
    var.save_pretrained(tmp_path / 'pretrained')   # with classes.json
    labels = [0, 0, 1, 1, 2, 2, 3, 4]
    if layout == 'pth':
        env = {'VAR_NB_DEPTH': '2', 'VAR_NB_VAE_CKPT': str(tmp_path / 'vae.pth'), 'VAR_NB_VAR_CKPT': str(tmp_path / 'var.pth'),
               'VAR_NB_BUILD': json.dumps(dict(V=64, Cvae=8, ch=32, patch_nums=[1, 2, 3, 4], num_classes=5))}
    else:   # the folder's config.json defines the model: no depth, no build arguments
        env = {'VAR_NB_VAR_CKPT': str(tmp_path / 'pretrained')}
    env.update({'VAR_NB_CLASS_LABELS': ','.join(map(str, labels)), 'VAR_NB_SAVE': str(tmp_path / 'grid.png'), 'HF_HUB_OFFLINE': '1',
                'OMP_NUM_THREADS': '1'})
    for k in ('VAR_NB_DEPTH', 'VAR_NB_BUILD', 'VAR_NB_VAE_CKPT'):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(REPO / 'demo_sample.ipynb', as_version=4)
    NotebookClient(nb, timeout=120, kernel_name='python3', resources={'metadata': {'path': str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    assert not [o for o in outputs if o.get('output_type') == 'error']
    assert any('image/png' in o.get('data', {}) for o in outputs), 'the grid is shown'
    assert any('VAR d2 ready on' in o.get('text', '') for o in outputs)
    shown = 'classes: 0, 1, 2, 3, 4' if layout == 'pth' else 'classes: 0: tench, 1: goldfish, 2: great white shark, 3: tiger shark, 4: hammerhead'
    assert any(shown in o.get('text', '') for o in outputs), 'the class names (a file of another name than var_d*.pth has none)'
    grid = np.asarray(Image.open(tmp_path / 'grid.png'))
    assert grid.shape == (64, 8 * 64, 3)
    # the same models in-process with the reference notebook's settings: seed 0, cfg 4, top-k 900 (of at most V), top-p 0.95
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            img_B3HW = var.autoregressive_infer_cfg(B=len(labels), label_B=torch.tensor(labels), cfg=4, top_k=min(900, var.V), top_p=0.95,
                                                    g_seed=0, more_smooth=False)
    finally:
        torch.set_num_threads(threads)
    want = torchvision.utils.make_grid(img_B3HW, nrow=8, padding=0).permute(1, 2, 0).mul(255).numpy().astype(np.uint8)
    assert np.array_equal(grid, want)


def test_the_committed_notebook_is_what_the_generator_writes(tmp_path):
    run_script(['tools/make_demo_notebook.py', f'--out={tmp_path / "nb.ipynb"}'])
    assert (tmp_path / 'nb.ipynb').read_bytes() == (REPO / 'demo_sample.ipynb').read_bytes()
