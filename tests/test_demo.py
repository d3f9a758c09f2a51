"""demo.py end to end in its reduced, seconds-long mode; the classifier and the fidelity are checked here independently;
a second run reuses what the first finished."""
import json
import re

import pytest
import torch
from PIL import Image

from conftest import run_script


def test_demo_quick_end_to_end_and_reuse(tmp_path):
    out = tmp_path / 'demo'
    res = run_script(['demo.py', '--quick', f'--out={out}'], timeout=600)
    last = res.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r'class fidelity (\d\.\d\d) \(chance 0\.17\), grid: (.+\.png)', last)
    assert m, last
    grid = Image.open(m.group(2))
    assert grid.size[1] > grid.size[0] * 2  # 6 rows (one per class) of 2 samples
    result = json.loads((out / 'result.json').read_text())
    for stage in ('data', 'vae/vae.pth', 'tokens/meta.json', 'var/ar-ckpt-last.pth', 'classifier.pth'):
        assert (out / stage).exists(), stage

    # the classifier, on the real held-out images: far above chance (1/6)
    from demo import SAMPLING
    from models import build_vae_var
    from utils.classifier import SmallClassifier, predict
    from utils.cpu_speed import speed_up
    from utils.data import build_dataset
    _, _, val_set, classes = build_dataset(str(out / 'data'), final_reso=64, mid_reso=1.0)
    clf = SmallClassifier(len(classes))
    clf.load_state_dict(torch.load(out / 'classifier.pth', weights_only=True)['model'])
    x_B3HW = torch.stack([val_set[i][0] for i in range(len(val_set))])
    y_B = torch.tensor([label for _, label in val_set.samples])
    acc = (predict(clf, x_B3HW) == y_B).float().mean().item()
    assert len(y_B) == 24 and acc >= 0.7, acc
    assert result['classifier_val_acc'] == pytest.approx(acc)
    # the fidelity: the demo's samples drawn again here from the VAR checkpoint and labelled by that classifier
    ck = torch.load(out / 'var' / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    t = ck['args']
    vae, var = build_vae_var(device='cpu', patch_nums=t['patch_nums'], V=t['vocab_size'], Cvae=t['z_channels'], ch=t['vae_ch'],
                             share_quant_resi=t['share_quant_resi'], num_classes=t['num_classes'], depth=t['depth'], shared_aln=t['saln'],
                             attn_l2_norm=t['anorm'])
    vae.load_state_dict(ck['trainer']['vae_local'], strict=True)
    var.load_state_dict(ck['trainer']['var_wo_ddp'], strict=True)
    var.eval()
    speed_up(vae, var)   # as demo.py samples
    labels_B = torch.arange(len(classes)).repeat_interleave(4)
    with torch.inference_mode():
        img_B3HW = var.autoregressive_infer_cfg(B=len(labels_B), label_B=labels_B, g_seed=0, **SAMPLING)
    hit_B = (predict(clf, img_B3HW * 2 - 1) == labels_B).float()
    fidelity = hit_B.mean().item()
    assert 0 <= fidelity <= 1 and m.group(1) == f'{fidelity:.2f}' and result['class_fidelity'] == pytest.approx(fidelity)
    assert result['per_class'] == {c: pytest.approx(hit_B[labels_B == i].mean().item(), abs=1e-3) for i, c in enumerate(classes)}

    again = run_script(['demo.py', '--quick', f'--out={out}'], timeout=600)
    assert again.stdout.strip().splitlines()[-1] == last          # same samples, same check
    assert again.stdout.count('training already finished') == 2 and 'complete already' in again.stdout
    assert '[classifier] trained' not in again.stdout
