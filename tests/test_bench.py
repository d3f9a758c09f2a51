"""bench.py runs end to end (a benchmark itself, so not part of `make test`: `pytest -m benchmark`)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.benchmark
def test_compare_quick_writes_every_measurement(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / 'bench.py'), 'compare', '--quick', '--repeat=2', f'--out_dir={tmp_path}'],
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / 'compare.json').read_text())
    assert [r['what'] for r in results] == ['train'] * 5 + ['sample'] * 3
    for r in results:
        assert r['seconds']['total'] > 0 and r['peak_memory_gb'] > 0.1 and len(r['totals']) == 2
    train = [r for r in results if r['what'] == 'train']
    assert train[2]['seconds']['tokenise'] < 0.2 * train[0]['seconds']['tokenise']   # --tokens skips tokenisation
    assert 'sampled images vs the baseline' in res.stdout and '| this code, fp32 |' in res.stdout
