"""demo.py end to end in its reduced, seconds-long mode; a second run reuses what the first finished."""
import json
import re

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
    assert abs(result['class_fidelity'] - float(m.group(1))) < 0.006 and len(result['per_class']) == 6
    for stage in ('data', 'vae/vae.pth', 'tokens/meta.json', 'var/ar-ckpt-last.pth', 'classifier.pth'):
        assert (out / stage).exists(), stage

    again = run_script(['demo.py', '--quick', f'--out={out}'], timeout=600)
    assert again.stdout.strip().splitlines()[-1] == last          # same samples, same check
    assert again.stdout.count('training already finished') == 2 and 'complete already' in again.stdout
    assert '[classifier] trained' not in again.stdout
