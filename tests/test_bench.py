"""bench.py runs end to end (the measuring tests are benchmarks, so not part of `make test`: `pytest -m benchmark`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from cpu_kernels import describe_choices


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


SIDE_BY_SIDE_ROWS = ['training step, live tokenisation', 'training step, pre-extracted tokens', 'sampling a batch']


def run_compare_reference(reference, out_dir):
    return subprocess.run([sys.executable, str(REPO / 'bench.py'), 'compare', f'--reference={reference}', '--quick', '--repeat=1',
                           f'--out_dir={out_dir}'], capture_output=True, text=True, cwd=REPO, timeout=900)


@pytest.mark.benchmark
@pytest.mark.parametrize('which', ['this repo', 'VAR_REFERENCE_IMPL'])
def test_compare_reference_quick_runs_both_sides(tmp_path, which):
    """Our repo has the reference's public API, so it stands in for the reference; VAR_REFERENCE_IMPL=DIR runs the real one."""
    reference = REPO if which == 'this repo' else os.environ.get('VAR_REFERENCE_IMPL')
    if reference is None:
        pytest.skip('set VAR_REFERENCE_IMPL to a work tree of FoundationVision/VAR to compare with it')
    res = run_compare_reference(reference, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / 'compare_reference.json').read_text())
    runs = out['runs']
    assert [(r['row'], r['side']) for r in runs] == [(row, side) for row in ('train_live', 'train_tokens', 'sample')
                                                     for side in ('reference', 'ours')]   # interleaved
    ref_module = str(Path(reference).resolve() / 'models' / '__init__.py')
    assert out['modules'] == {'reference': [ref_module], 'ours': [str(REPO / 'models' / '__init__.py')]}
    for r in runs:
        assert r['seconds'] > 0 and len(r['steps']) == 1 and 0.1 < r['peak_rss_gib'] < 16 and r['threads'] == out['machine']['threads']
    assert out['sanity']['tokens'] > 0 and out['sanity']['tokens_differing'] == 0   # same weights, same token maps
    assert out['sanity']['sampled_images_max_abs_diff'] < 1e-3
    if which == 'this repo':   # the same code on both sides: bit for bit the same results
        assert out['sanity']['sampled_images_max_abs_diff'] == 0
        assert out['sanity']['train_loss']['reference'] == out['sanity']['train_loss']['ours']
    assert [s['title'] for s in out['summary'] if s['what'] == 'seconds'] == SIDE_BY_SIDE_ROWS
    for s in out['summary']:
        assert s['ratio_best'] == pytest.approx(s['reference']['best'] / s['ours']['best'])
        row = f"| {s['title']} | {s['reference']['best']:.2f} / {s['reference']['median']:.2f} {s['unit']} |"
        assert row in res.stdout
    assert 'CPU: ' in res.stdout and 'avx512f' in res.stdout and f"{out['machine']['threads']} threads" in res.stdout
    assert '| d2, batch 2, 64 px, float32,' in res.stdout


def test_compare_reference_rejects_a_folder_without_the_models_package(tmp_path):
    res = run_compare_reference(tmp_path, tmp_path / 'out')
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert res.stderr.strip().splitlines() == [f'error: --reference={tmp_path}: no models/__init__.py there; give the root of a work '
                                               'tree of the reference implementation (github.com/FoundationVision/VAR), kept '
                                               'outside this project']
    assert not (tmp_path / 'out').exists()


def test_cpu_reports_the_machine_and_the_fast_paths_chosen(monkeypatch):
    for var in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY'):   # the OpenMP line then gives the rule's advice, here and in bench.py
        monkeypatch.delenv(var, raising=False)
    res = subprocess.run([sys.executable, str(REPO / 'bench.py'), 'cpu'], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    head, *paths = res.stdout.strip().splitlines()
    assert head.startswith('CPU: ') and all(f'{flag} ' in head for flag in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'))
    assert f'torch {torch.__version__}' in head and ' threads' in head
    expected = describe_choices()
    assert [p[2:] for p in paths[:len(expected)]] == expected, 'the kernels chosen, as cpu_kernels describes them'
    assert paths[len(expected)].startswith('- attention: ')
