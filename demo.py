"""The whole pipeline on the built-in dataset, on a CPU and offline: `make demo`.

1. write the built-in shapes dataset (6 classes: circle, horizontal bar, vertical bar × red, blue; 64 px);
2. train a small tokenizer with train_vae.py;
3. write the token maps of every image and its flip with extract_tokens.py;
4. train a small VAR with train.py --tokens_path on them;
5. sample a class-conditional grid (one row per class);
6. check it: a small classifier trained on the real images labels the samples.

It ends with one line `class fidelity X.XX (chance Y.YY), grid: PATH`. Every stage reuses what a
previous run finished (the training scripts resume), so a second run is quick.
"""
import json
import logging
import os
import os.path as osp
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from utils.flags import flag, parse_dataclass

REPO = osp.dirname(osp.abspath(__file__))

# (full demo, --quick for the tests: tiny models, but a classifier that already tells the classes apart)
CONFIGS = {
    'full': dict(train_per_class=300, val_per_class=30, vae_ep=8, vae_bs=32, var_ep=25, var_bs=64, depth=4, clf_ep=6, clf_bs=64, per_class=8,
                 check_per_class=50),
    'quick': dict(train_per_class=10, val_per_class=4, vae_ep=1, vae_bs=8, var_ep=1, var_bs=8, depth=2, clf_ep=12, clf_bs=8, per_class=2,
                  check_per_class=4),
}
TOKENIZER = dict(vocab_size=256, z_channels=16, vae_ch=32, pn='1_2_3_4')
SAMPLING = dict(cfg=3.0, top_k=0, top_p=0.9, more_smooth=False)

logger = logging.getLogger('demo')


def run_stage(name: str, argv: Sequence[str]) -> None:
    """Run a project script in a subprocess, its progress bar shown; stop the demo if it fails."""
    logger.info('[%s] %s', name, ' '.join(argv))
    t = time.time()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    res = subprocess.run([sys.executable] + list(argv), cwd=REPO, env=env)
    if res.returncode != 0:
        raise SystemExit(f'demo: the {name} stage failed (exit code {res.returncode}); see its output above')
    logger.info('[%s] done in %.0fs', name, time.time() - t)


@dataclass
class DemoArgs:
    """Flags of demo.py."""
    out: str = flag('demo_output', 'folder for the dataset, checkpoints and the grid; a rerun reuses what an earlier one finished',
                    group='output')
    quick: bool = flag(False, 'a seconds-long run with tiny models (for the tests)', group='model')
    seed: int = flag(0, 'seed of the dataset, of both training runs and of the samples', group='environment')


def make_data(out: str, cfg: dict, seed: int) -> Tuple[str, List[str]]:
    """1. the built-in shapes dataset in OUT/data; its class folders in sorted order."""
    from utils.toy_data import make_shapes_dataset
    data = osp.join(out, 'data')
    classes = make_shapes_dataset(data, train_per_class=cfg['train_per_class'], val_per_class=cfg['val_per_class'], size=64,
                                  n_shapes=3, n_colours=2, seed=seed, gradient=False, min_r=0.25, max_r=0.4, bg_jitter=60)
    classes = sorted(classes)   # label i is the i-th class folder in sorted order, as the training scripts read them
    logger.info('[data] %d classes in %s: %s', len(classes), data, ', '.join(classes))
    return data, classes


def train_models(out: str, data: str, cfg: dict, seed: int) -> str:
    """2. the tokenizer, 3. the token maps, 4. the VAR, each a script in a subprocess; the VAR's output folder."""
    tok_flags = [f'--{k}={v}' for k, v in TOKENIZER.items()]
    vae_dir = osp.join(out, 'vae')
    run_stage('tokenizer', ['train_vae.py', f'--data_path={data}', f'--local_out_dir_path={vae_dir}', *tok_flags,
                            f'--bs={cfg["vae_bs"]}', f'--ep={cfg["vae_ep"]}', '--lr=1e-3', '--wp=0.3', '--wpe=0.3', '--fp16=2',
                            '--mid_reso=1', '--lpips_weight=0', '--disc_start=-1', '--reinit_dead=50', f'--seed={seed}',
                            '--val_every_ep=100'])
    tok_dir = osp.join(out, 'tokens')
    vae_ckpt = osp.join(vae_dir, 'vae.pth')
    run_stage('tokens', ['extract_tokens.py', f'--data_path={data}', f'--vae_ckpt={vae_ckpt}', f'--tokens_path={tok_dir}', *tok_flags,
                         '--mid_reso=1'])
    var_dir = osp.join(out, 'var')
    run_stage('VAR', ['train.py', f'--tokens_path={tok_dir}', f'--vae_ckpt={vae_ckpt}', f'--local_out_dir_path={var_dir}',
                      *tok_flags, f'--depth={cfg["depth"]}', f'--bs={cfg["var_bs"]}', f'--ep={cfg["var_ep"]}', '--tblr=2e-3', '--fp16=2',
                      '--wp=1', '--wpe=0.1', '--hflip=1', f'--seed={seed}', '--val_every_ep=100'])
    return var_dir


def sample_grid(out: str, var_dir: str, classes: List[str], cfg: dict, seed: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """5. samples of every class from the trained VAR, and OUT/grid.png with one row per class: (samples, labels, grid path)."""
    from utils.arg_util import ModelFlags
    from utils.cpu_speed import speed_up
    from utils.model_loading import load_for_sampling   # as sample.py reads a train.py checkpoint: its configs, its vae_local
    vae, var, _ = load_for_sampling(torch.device('cpu'), ModelFlags(var_ckpt=osp.join(var_dir, 'ar-ckpt-last.pth')))
    speed_up(vae, var)   # cpu_kernels, where present, as sample.py
    n, n_check = cfg['per_class'], cfg['check_per_class']
    labels = torch.arange(len(classes)).repeat_interleave(n_check)
    t = time.time()
    with torch.inference_mode():
        samples = var.autoregressive_infer_cfg(B=len(labels), label_B=labels, g_seed=seed, **SAMPLING)
    from utils.imgs import save_grid
    shown = torch.cat([samples[i * n_check:i * n_check + n] for i in range(len(classes))])
    grid_path = save_grid(shown, nrow=n, path=osp.join(out, 'grid.png'), scale=2)
    logger.info('[samples] %d images (%d per class) in %.1fs; the grid shows %d per class: %s', len(labels), n_check, time.time() - t,
                n, grid_path)
    return samples, labels, grid_path


def check_samples(out: str, data: str, classes: List[str], cfg: dict, seed: int, samples: torch.Tensor, labels: torch.Tensor,
                  grid_path: str, t0: float) -> str:
    """6. the check: a classifier trained on the real images labels the samples; OUT/result.json and the final line."""
    from utils.classifier import SmallClassifier, predict, train_classifier
    from utils.data import build_dataset
    clf_path = osp.join(out, 'classifier.pth')
    _, train_set, val_set, _ = build_dataset(data, final_reso=64, mid_reso=1.0, seed=seed)
    clf = SmallClassifier(len(classes))
    stamp = {'classes': classes, 'epochs': cfg['clf_ep'], 'bs': cfg['clf_bs'], 'n_train': len(train_set), 'seed': seed}
    if osp.isfile(clf_path) and torch.load(clf_path, weights_only=True).get('stamp') == stamp:
        saved = torch.load(clf_path, weights_only=True)
        clf.load_state_dict(saved['model'])
        val_acc = saved['val_acc']
    else:
        t = time.time()
        clf, val_acc = train_classifier(train_set, val_set, len(classes), epochs=cfg['clf_ep'], bs=cfg['clf_bs'], seed=seed)
        torch.save({'model': clf.state_dict(), 'val_acc': val_acc, 'stamp': stamp}, clf_path + '.tmp')
        os.replace(clf_path + '.tmp', clf_path)
        logger.info('[classifier] trained in %.0fs', time.time() - t)
    logger.info('[classifier] accuracy on the real val images: %.3f', val_acc)
    pred = predict(clf, samples * 2 - 1)
    fidelity = (pred == labels).float().mean().item()
    per_class = {c: round((pred[labels == i] == i).float().mean().item(), 3) for i, c in enumerate(classes)}
    with open(osp.join(out, 'result.json'), 'w') as f:
        json.dump({'class_fidelity': fidelity, 'chance': 1 / len(classes), 'per_class': per_class, 'classifier_val_acc': val_acc,
                   'grid': grid_path, 'sampling': SAMPLING, 'seconds': round(time.time() - t0, 1)}, f, indent=1)
    logger.info('[check] per class: %s; total %.0fs', per_class, time.time() - t0)
    return f'class fidelity {fidelity:.2f} (chance {1 / len(classes):.2f}), grid: {grid_path}'


def main(argv: Sequence[str] = None) -> str:
    a = parse_dataclass(DemoArgs, argv, description=__doc__.splitlines()[0])
    logging.basicConfig(level=logging.INFO, format='[%(asctime)s] %(message)s', datefmt='%H:%M:%S', stream=sys.stdout)
    cfg = CONFIGS['quick' if a.quick else 'full']
    out = osp.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    data, classes = make_data(out, cfg, a.seed)
    var_dir = train_models(out, data, cfg, a.seed)
    samples, labels, grid_path = sample_grid(out, var_dir, classes, cfg, a.seed)
    line = check_samples(out, data, classes, cfg, a.seed, samples, labels, grid_path, t0)
    print(line, flush=True)
    return line


if __name__ == '__main__':
    main()
