"""Writes demo_sample.ipynb (the notebook is generated so that its code stays reviewable here).

    python tools/make_demo_notebook.py            # rewrites demo_sample.ipynb beside this folder
    python tools/make_demo_notebook.py --out X    # writes it elsewhere (the tests compare it with the committed one)

The output is the same on every run (cell ids follow the cell order), so the committed notebook is exactly what this writes.
"""
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import nbformat as nbf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'demo_sample.ipynb')
if __name__ == '__main__':   # run as tools/make_demo_notebook.py: the project's modules are one folder up
    sys.path.insert(0, REPO)
from utils.flags import flag, parse_dataclass  # noqa: E402  (standard library only)


@dataclass
class NotebookArgs:
    """Flags of tools/make_demo_notebook.py."""
    out: str = flag(NOTEBOOK, 'where to write the notebook (.ipynb)',
                    group='output')


# the three cells of the notebook
INTRO_MD = """# VAR: sampling from the published checkpoints

Builds the tokenizer and a VAR, gets the published weights of [`FoundationVision/var`](https://huggingface.co/FoundationVision/var)
(a local file of the same name first, else `huggingface_hub` downloads it once), and samples a class-conditional grid
with the settings of the reference notebook (seed 0, cfg 4, top-k 900, top-p 0.95, classes 980, 437, 22, 562), and names
the classes it drew (`var.class_names`: ImageNet's 1000 for the published models, a saved folder's `classes.json`).

Environment variables point it at other files (the tests use tiny local checkpoints this way):
`VAR_NB_DEPTH`, `VAR_NB_VAE_CKPT`, `VAR_NB_VAR_CKPT` (a file, a folder written by `save_pretrained`, or a Hub repo id),
`VAR_NB_BUILD` (JSON of extra `build_vae_var` arguments), `VAR_NB_CLASS_LABELS` (comma-separated),
`VAR_NB_SAVE` (a path to also save the grid as PNG)."""

BUILD_CODE = """import json, os, random, sys

sys.path.insert(0, os.path.abspath('.'))   # the repository root

import numpy as np
import PIL.Image as PImage
import torch
import torchvision

from models import build_vae_var, load_pretrained
from models.config import PUBLISHED, PUBLISHED_VAE, published_build_kwargs
from models.hub import resolve_checkpoint   # local path first, huggingface_hub second
from models.pretrained import class_names, looks_like_repo_id
from models.weights import load_weights   # .pth or .safetensors
from utils.cpu_speed import speed_up   # cpu_kernels.convert where that optional package is present
from utils.weights import load_tokenizer_state

MODEL_DEPTH = int(os.environ.get('VAR_NB_DEPTH', 16))   # 16, 20, 24, 30 or 36 for the published models
vae_ckpt = os.environ.get('VAR_NB_VAE_CKPT', PUBLISHED_VAE)
var_ckpt = os.environ.get('VAR_NB_VAR_CKPT', f'var_d{MODEL_DEPTH}.pth')   # or a save_pretrained folder, or a Hub repo id
device = 'cuda' if torch.cuda.is_available() else 'cpu'

if os.path.isdir(var_ckpt) or looks_like_repo_id(var_ckpt):   # its config.json defines the model; its vae/ the tokenizer
    vae, var = load_pretrained(var_ckpt, device=device)
    MODEL_DEPTH = var.depth
else:
    build = published_build_kwargs(f'var_d{MODEL_DEPTH}.pth') if f'var_d{MODEL_DEPTH}.pth' in PUBLISHED else {}
    build.update(depth=MODEL_DEPTH, **json.loads(os.environ.get('VAR_NB_BUILD', '{}')))
    vae, var = build_vae_var(device=device, **build)
    vae.load_state_dict(load_tokenizer_state(vae_ckpt)[0], strict=True)
    var.load_state_dict(load_weights(resolve_checkpoint(var_ckpt)), strict=True)
    names = class_names(var_ckpt)   # ImageNet's for the published var_d*.pth, None for other files
    var.class_names = names if names and len(names) <= var.num_classes else None
vae.eval()
var.eval()
speed_up(vae, var)   # the CPU kernels: the same weights, faster on the CPU
for p in vae.parameters(): p.requires_grad_(False)
for p in var.parameters(): p.requires_grad_(False)
print(f'VAR d{MODEL_DEPTH} ready on {device}: {sum(p.numel() for p in var.parameters()) / 1e6:.1f}M parameters')"""

SAMPLE_CODE = """# the reference notebook's settings
seed = 0
cfg = 4
class_labels = tuple(int(c) for c in os.environ.get('VAR_NB_CLASS_LABELS', '980,980,437,437,22,22,562,562').split(','))
more_smooth = False   # True for smoother pictures (not for FID)
top_k, top_p = min(900, var.V), 0.95   # 900 of the published 4096 codes

torch.manual_seed(seed)
random.seed(seed)
np.random.seed(seed)
torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False
tf32 = True
torch.backends.cudnn.allow_tf32 = bool(tf32)
torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
torch.set_float32_matmul_precision('high' if tf32 else 'highest')

B = len(class_labels)
label_B = torch.tensor(class_labels, device=device)
print('classes:', ', '.join(f'{c}: {var.class_names[c]}' if var.class_names else str(c) for c in dict.fromkeys(class_labels)))
with torch.inference_mode():
    with torch.autocast('cuda', enabled=(device == 'cuda'), dtype=torch.float16, cache_enabled=True):
        recon_B3HW = var.autoregressive_infer_cfg(B=B, label_B=label_B, cfg=cfg, top_k=top_k, top_p=top_p, g_seed=seed, more_smooth=more_smooth)

chw = torchvision.utils.make_grid(recon_B3HW.float(), nrow=8, padding=0, pad_value=1.0)
chw = chw.permute(1, 2, 0).mul_(255).cpu().numpy()
grid = PImage.fromarray(chw.astype(np.uint8))
if os.environ.get('VAR_NB_SAVE'):
    grid.save(os.environ['VAR_NB_SAVE'])
grid"""


def main(argv: Optional[Sequence[str]] = None) -> str:
    a = parse_dataclass(NotebookArgs, argv, description=__doc__.splitlines()[0])
    nb = nbf.v4.new_notebook()
    nb.metadata['kernelspec'] = {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'}
    nb.metadata['language_info'] = {'name': 'python'}
    cells = [nbf.v4.new_markdown_cell(INTRO_MD), nbf.v4.new_code_cell(BUILD_CODE), nbf.v4.new_code_cell(SAMPLE_CODE)]
    for i, cell in enumerate(cells):
        cell['id'] = f'cell-{i}'
    nb.cells = cells
    nbf.write(nb, a.out)
    return a.out


if __name__ == '__main__':
    main()
