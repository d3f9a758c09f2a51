"""tools/gpu_check.sh: its argument errors and its summary (fast); its whole dry run on the CPU (a benchmark: minutes)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

STEPS = [('cuda_tests', '0', 12, 230), ('train_bf16', '0', 20, 50), ('train_fp16', '124', 50, 50), ('train_fp32_tf32', '1', 3, 50),
         ('sample_fp32_tf32', '0', 9, 50), ('sample_bf16', 'not_run', 0, 3), ('reference_compare', '0', 120, 190)]
JUNIT = '''<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_cuda_amp" name="test_a" time="0.1"/>
<testcase classname="tests.test_cuda_amp" name="test_b" time="0.1"><failure message="AssertionError: loss off&#10;more">x</failure></testcase>
<testcase classname="tests.test_cuda_attention" name="test_c" time="0.0"><skipped type="pytest.skip" message="xformers is not installed">s</skipped></testcase>
</testsuite></testsuites>'''


def bench_line(what, dtype, bs, total, tokenise=None):
    seconds = {'total': total}
    if tokenise is not None:
        seconds.update(tokenise=tokenise, forward=0.1, backward=0.1, optimiser=0.1)
    return json.dumps({'what': what, 'depth': 16, 'bs': bs, 'reso': 256, 'dtype': dtype, 'tf32': dtype == 'fp32', 'steps': 3, 'device': 'cuda',
                       'seconds': seconds, 'images_per_sec': bs / total, 'peak_memory_gb': 12.5, 'final_loss': 8.3})


def reference_summary_row(row, what, ref, ours):
    r = {'row': row, 'what': what, 'title': row, 'unit': 's', 'reference': {'best': ref, 'median': ref}, 'ours': {'best': ours, 'median': ours},
         'ratio_best': ref / ours, 'ratio_median': ref / ours}
    return dict(r, images_per_sec={'reference': 32 / ref, 'ours': 32 / ours}) if what == 'seconds' else r


def test_summary_reports_every_step_also_failed_ones(tmp_path):
    work, out = tmp_path / 'work', tmp_path / 'out'
    work.mkdir()
    out.mkdir()
    (work / 'steps.tsv').write_text(''.join(f'{n}\t{rc}\t{s}\t{b}\n' for n, rc, s, b in STEPS))
    (work / 'missing.txt').write_text('\n')
    (out / 'junit.xml').write_text(JUNIT)
    (work / 'train_bf16.json').write_text('some stray line\n' + bench_line('train', 'bf16', 32, 0.5, tokenise=0.1) + '\n')
    (work / 'sample_fp32_tf32.json').write_text(bench_line('sample', 'fp32', 64, 2.0))
    (out / 'compare_reference.json').write_text(json.dumps({'summary': [
        reference_summary_row('train_live_bf16', 'seconds', 0.5, 0.4), reference_summary_row('train_live_bf16', 'peak_cuda_gib', 30, 20),
        reference_summary_row('sample_fp16', 'seconds', 1.0, 0.5)]}))
    res = subprocess.run([sys.executable, str(REPO / 'tools' / 'gpu_check_summary.py'), f'--work={work}', f'--out={out}', '--device=cuda',
                          '--seconds=99'], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 1, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith('GPU CHECK: FAIL in 99s | ')
    for part in ('tests 1 passed, 1 failed, 1 skipped', 'train_bf16 64 img/s 12.5 GB', 'sample_fp32_tf32 32 img/s 12.5 GB',
                 'train_fp16 timed out after 50s', 'train_fp32_tf32 failed (exit 1)', 'sample_bf16 not run: no time left',
                 'vs the reference (best round): train_live_bf16 1.25x, sample_fp16 2.00x'):
        assert part in line, part
    s = json.loads((out / 'summary.json').read_text())
    assert s['status'] == 'fail' and s['seconds'] == 99 and s['missing_packages'] == []
    assert [x['name'] for x in s['steps']] == [n for n, *_ in STEPS]
    assert s['tests']['failures'] == ['tests.test_cuda_amp::test_b: AssertionError: loss off']
    assert s['tests']['skip_reasons'] == {'xformers is not installed': 1}
    m = s['measurements']['train_bf16']
    assert m['images_per_sec'] == 64.0 and m['images_per_sec_from_tokens'] == pytest.approx(80.0) and m['peak_memory_gb'] == 12.5
    assert set(s['measurements']) == {'train_bf16', 'sample_fp32_tf32'}
    ref = s['reference_compare']
    assert [(r['row'], r['what'], r['ratio_best']) for r in ref] == [('train_live_bf16', 'seconds', 1.25), ('train_live_bf16', 'peak_cuda_gib', 1.5),
                                                                    ('sample_fp16', 'seconds', 2.0)]
    assert ref[0]['images_per_sec'] == {'reference': 64.0, 'ours': 80.0} and ref[0]['reference']['best'] == 0.5
    assert 'torch' in s and 'python' in s


@pytest.mark.parametrize('argv, message', [([], 'usage: tools/gpu_check.sh OUT_DIR'), (['out', '--device=tpu'], "unknown argument '--device=tpu'"),
                                           (['--device=cpu'], "OUT_DIR '--device=cpu' looks like a flag")])
def test_gpu_check_argument_errors(tmp_path, argv, message):
    res = subprocess.run([str(REPO / 'tools' / 'gpu_check.sh'), *argv], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and message in res.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.benchmark
def test_dry_run_on_the_cpu_end_to_end(tmp_path):
    """The whole check with --device=cpu: the CUDA tests skip, bench.py runs at tiny sizes, summary.json is complete."""
    env = dict(os.environ, VAR_REFERENCE_IMPL=str(REPO))   # this repo has the reference's API: it stands in for it
    res = subprocess.run([str(REPO / 'tools' / 'gpu_check.sh'), str(tmp_path), '--device=cpu'], capture_output=True, text=True, cwd=REPO,
                         timeout=1800, env=env)
    line = res.stdout.strip().splitlines()[-1]
    assert res.returncode == 0 and line.startswith('GPU CHECK DRY RUN (cpu): PASS'), res.stdout[-3000:]
    s = json.loads((tmp_path / 'summary.json').read_text())
    assert s['status'] == 'pass' and s['dry_run'] and s['tests']['failed'] == 0 and s['tests']['passed'] == 0
    assert s['tests']['skipped'] >= 70 and any('needs an NVIDIA GPU' in r for r in s['tests']['skip_reasons'])
    assert set(s['measurements']) == {'train_bf16_tf32', 'train_fp16_tf32', 'train_fp32_tf32', 'sample_fp32_tf32', 'sample_bf16'}
    assert [r['row'] for r in s['reference_compare'] if r['what'] == 'seconds'] == ['train_live', 'train_tokens', 'sample']
    assert 'vs the reference (best round): train_live ' in line
    for m in s['measurements'].values():
        assert m['images_per_sec'] > 0 and m['peak_memory_gb'] > 0 and m['device'] == 'cpu' and m['depth'] == 2
    assert all(m['final_loss'] > 0 for n, m in s['measurements'].items() if n.startswith('train'))
    for name in ('pytest.log', 'junit.xml', 'steps.log', 'env.txt'):
        assert (tmp_path / name).is_file(), name
