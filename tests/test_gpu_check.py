"""tools/gpu_check.sh and what it runs: its argument errors, its summary, the pieces of its measuring steps (bench.py
compare's pairing of variants with the reference's rows, the profile's analysis, the memory fit, the export's
projection), all fast; its whole dry run on the CPU (a benchmark: minutes)."""
import json
import os
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import bench
from conftest import REPO, build_tiny
from tools import gpu_export, gpu_memory, gpu_profile

STEPS = [('cuda_tests', '0', 12, 85), ('profile', '0', 50, 65), ('compare', '124', 185, 185), ('memory', '1', 3, 50),
         ('export', 'not_run', 0, 3)]
JUNIT = '''<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.test_cuda_amp" name="test_a" time="0.1"/>
<testcase classname="tests.test_cuda_amp" name="test_b" time="0.1"><failure message="AssertionError: loss off&#10;more">x</failure></testcase>
<testcase classname="tests.test_cuda_attention" name="test_c" time="0.0"><skipped type="pytest.skip" message="xformers is not installed">s</skipped></testcase>
</testsuite></testsuites>'''


def side_run(row, side, rnd, seconds, peak=20.0, status='measured', warmup=(1.0,)):
    """A measuring process's JSON line, as bench.py side prints it (the fields summarise reads)."""
    if status != 'measured':
        return {'row': row, 'side': side, 'round': rnd, 'status': status}
    return {'row': row, 'side': side, 'round': rnd, 'status': status, 'seconds': seconds, 'images_per_sec': 32 / seconds,
            'peak_cuda_gib': peak, 'peak_rss_gib': 3.0, 'warmup_s': list(warmup), 'loss': 8.0, 'module': f'/{side}/models/__init__.py'}


def cuda_runs():
    """Two rounds of the CUDA rows: every variant of this code measured, except compile+graphs, unavailable."""
    runs = []
    for rnd in range(2):
        runs += [side_run('train_live_bf16', 'reference', rnd, 0.24 + rnd * 0.02, 24.9),
                 side_run('train_live_bf16', 'ours', rnd, 0.24, 24.9),
                 side_run('train_tokens_bf16_compiled', 'ours', rnd, 0.08, 20.0, warmup=(30.0 - 20 * rnd, 0.1)),
                 side_run('sample_fp16', 'reference', rnd, 0.27, 6.8), side_run('sample_fp16_graphs', 'ours', rnd, 0.135, 7.0),
                 side_run('sample_fp16_compiled_graphs', 'ours', rnd, 0, status='unavailable: utils.compile.compile_blocks cannot be imported')]
    return runs


CUDA_ROWS = ('train_live_bf16', 'train_tokens_bf16_compiled', 'sample_fp16_graphs', 'sample_fp16_compiled_graphs')


def test_compare_pairs_each_variant_with_its_reference_row():
    summary = bench.summarise(cuda_runs(), CUDA_ROWS)
    seconds = {s['row']: s for s in summary if s['what'] == 'seconds'}
    assert [s['row'] for s in summary if s['what'] == 'peak_cuda_gib'] == list(CUDA_ROWS)
    tokens = seconds['train_tokens_bf16_compiled']   # from tokens, compiled: against the reference's live step
    assert tokens['reference_row'] == 'train_live_bf16' and tokens['reference']['rounds'] == [0.24, 0.26]
    assert tokens['ratio_median'] == pytest.approx(0.25 / 0.08) and tokens['ratio_best'] == pytest.approx(0.24 / 0.08)
    assert tokens['images_per_sec'] == {'reference': pytest.approx(32 / 0.24), 'ours': pytest.approx(400)}
    assert tokens['warmup_s']['ours'] == [[30.0, 0.1], [10.0, 0.1]] and tokens['status'] == 'measured'
    assert seconds['sample_fp16_graphs']['reference_row'] == 'sample_fp16' and seconds['sample_fp16_graphs']['ratio_median'] == pytest.approx(2.0)
    missing = seconds['sample_fp16_compiled_graphs']
    assert missing['ours'] is None and missing['ratio_median'] is None and missing['reference']['median'] == pytest.approx(0.27)
    assert missing['status'] == 'unavailable: utils.compile.compile_blocks cannot be imported'
    memory = {s['row']: s for s in summary if s['what'] == 'peak_cuda_gib'}
    assert memory['train_tokens_bf16_compiled']['ours']['median'] == 20.0 and memory['train_tokens_bf16_compiled']['reference']['median'] == 24.9


def test_compare_variant_table_and_round_order(capsys):
    bench.print_variant_table(bench.summarise(cuda_runs(), CUDA_ROWS), 'd16, batch 32', 2)
    out = capsys.readouterr().out
    assert ('| train_tokens_bf16_compiled | train_live_bf16 | 0.240 / 0.250 s | 0.080 / 0.080 s | 3.00x / 3.12x | 133.3, 400.0 '
            '| 24.90, 20.00 GiB | 30.0+0.1; 10.0+0.1 |') in out
    assert '| sample_fp16_compiled_graphs | sample_fp16 | 0.270 / 0.270 s | – | –x / –x |' in out
    assert '- sample_fp16_compiled_graphs: unavailable: utils.compile.compile_blocks cannot be imported' in out
    # a round: the reference's row, then the rows of this code timed against it; the CPU rows stay one pair each
    assert bench._groups(bench.DEVICE_ROWS['cuda']) == [
        ('train_live_bf16', ['train_live_bf16', 'train_live_bf16_compiled', 'train_tokens_bf16_compiled', 'train_tokens_bf16']),
        ('sample_fp16', ['sample_fp16', 'sample_fp16_graphs'])]
    assert bench._groups(bench.DEVICE_ROWS['cpu']) == [('train_live', ['train_live']), ('train_tokens', ['train_tokens']), ('sample', ['sample'])]
    assert not any(bench.ROW_FEATURES.get(ref) for ref, _ in bench._groups(tuple(bench.ROW_SPECS)))   # the reference runs plain rows


def test_a_missing_speed_feature_is_a_finding_not_an_error(monkeypatch):
    var = torch.nn.Linear(2, 2)
    monkeypatch.setitem(bench.FEATURE_MODULES, 'compile_blocks', 'utils.no_such_module')
    got, status, _ = bench.apply_features(var, ('compile_blocks',))
    assert got is var and status.startswith('unavailable: utils.no_such_module.compile_blocks cannot be imported '
                                            "(ModuleNotFoundError: No module named 'utils.no_such_module'")
    refusing = types.ModuleType('refusing_features')   # a feature that is there but refuses this model or device

    def use_cuda_graphs(model):
        raise RuntimeError('needs CUDA\nmore detail')
    refusing.use_cuda_graphs = use_cuda_graphs
    monkeypatch.setitem(sys.modules, 'refusing_features', refusing)
    monkeypatch.setitem(bench.FEATURE_MODULES, 'use_cuda_graphs', 'refusing_features')
    got, status, _ = bench.apply_features(var, ('use_cuda_graphs',))
    assert got is var and status == 'unavailable: refusing_features.use_cuda_graphs(var) raised RuntimeError: needs CUDA'


def test_sampling_keeps_the_drawn_tokens_of_its_last_call():
    """The tokens both implementations look up in the codebook after each scale's draw: what compare checks a CUDA-graph
    variant by (the same tokens as eager)."""
    vae, var = build_tiny(seed=3, V=1024)   # top-k 900, as compare samples
    seen = []
    label_B = torch.tensor([1, 4])
    with torch.inference_mode():
        want = var.autoregressive_infer_cfg(2, label_B, g_seed=0, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False,
                                            on_scale=lambda si, logits, idx_Bl: seen.append(idx_Bl.clone()))
    times, keep = bench._sample_steps(var, label_B, 2, 'fp32', warmup=1, vae=vae)
    assert len(times) == 2 and len(keep['warmup_s']) == 1
    assert [t.shape for t in keep['drawn_tokens']] == [(2, pn * pn) for pn in var.patch_nums]
    assert all(torch.equal(a, b) for a, b in zip(keep['drawn_tokens'], seen)) and torch.equal(keep['images'], want)
    assert bench._drawn_differing(keep['drawn_tokens'], seen) == (2 * sum(pn * pn for pn in var.patch_nums), 0)
    _, again = bench._sample_steps(var, label_B, 1, 'fp32')   # without vae: nothing kept, no hook left behind
    assert again['drawn_tokens'] == [] and not vae.quantize.embedding._forward_pre_hooks


def test_profile_analysis_on_real_cpu_events():
    device = torch.device('cpu')
    a, b = torch.randn(64, 64), torch.randn(64, 64)

    def step():
        with gpu_profile._marked(device, 'tokenizer'):
            torch.mm(a, b)
        (a * b).add_(1)
        torch.mm(a, b)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function('step'):
            step()
    r = gpu_profile.analyse(prof.events(), device, wall_unprofiled_s=1.0)
    shares = {c: v['share'] for c, v in r['categories'].items()}
    assert sum(shares.values()) == pytest.approx(1.0) and shares['tokenizer'] > 0 and shares['GEMM'] > 0
    assert {k['name'] for k in r['top']} >= {'aten::mm', 'aten::mul'} and r['kernels'] >= 4
    assert r['busy_ms'] <= r['kernel_ms'] + 1e-9 and r['launch_gaps_ms'] == pytest.approx(1000 - r['busy_ms'])
    assert gpu_profile._union_us([(0, 2), (1, 3), (5, 6)]) == 4
    assert [gpu_profile._category(n) for n in ('void pytorch_flash::flash_fwd_kernel<...>', 'sm90_xmma_fprop_implicit_gemm_bf16',
                                               'nvjet_hsh_256x128_2x1', 'triton_red_fused_native_layer_norm_0', 'triton_tem_fused_0',
                                               'void at::native::vectorized_elementwise_kernel<4>', 'Memcpy DtoD')] == [
        'attention', 'convolution', 'GEMM', 'norm/elementwise', 'attention', 'norm/elementwise', 'other']


class FakeDepthRun:
    """gpu_memory's DepthRun with a known memory line: peak = 5 + 0.5 * batch GiB (checkpointing: 0.25 per image)."""

    def __init__(self, oom_above=10 ** 9):
        self.oom_above, self.ran = oom_above, []
        self.opt = SimpleNamespace(zero_grad=lambda set_to_none: None)

    def measure(self, batch, ckpt):
        self.ran.append((batch, ckpt))
        if batch > self.oom_above:
            raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return 5 + (0.25 if ckpt else 0.5) * batch


def test_memory_fit_gives_each_card_its_largest_batch_and_runs_the_small_ones():
    model = {'ckpt_off': {'measured': {'8': 9.0, '16': 13.0}, 'status': 'measured'},
             'ckpt_on': {'measured': {'8': 7.0, '16': 9.0}, 'status': 'measured'}}
    args = SimpleNamespace(margin_gib=1.5, verify_max_batch=100)
    fake = FakeDepthRun(oom_above=60)
    gpu_memory.fill_cards(model, {'24 GB': 24.0, '80 GB': 80.0}, args, fake, lambda: True, lambda: None)
    off, on = model['ckpt_off'], model['ckpt_on']
    assert off['fit'] == {'a_gib': 5.0, 'b_gib_per_image': 0.5} and on['fit']['b_gib_per_image'] == 0.25
    assert off['max_batch']['24 GB'] == {'batch': 35, 'how': 'measured', 'usable_gib': 22.5, 'checked_peak_gib': 22.5}
    assert off['max_batch']['80 GB']['batch'] == 147 and off['max_batch']['80 GB']['how'] == 'fit'   # above verify_max_batch
    assert on['max_batch']['24 GB']['batch'] == 70 and on['max_batch']['24 GB']['how'] == 'fit (run: did not fit)'   # OOM at 70
    assert sorted(fake.ran) == [(35, False), (70, True)]
    assert gpu_memory.fit_line({8: 9.0}) is None and gpu_memory.fit_line({8: 9.0, 16: 9.0}) is None


def test_export_projection_from_the_png_counts():
    progress = [(1.0, 0), (10.0, 0), (12.0, 250), (14.0, 500), (16.0, 750), (18.0, 1000), (19.0, 1000)]
    r = gpu_export.summarise(progress, exit_s=21.0, n_target=1000, bs=250)
    assert r['images_per_sec'] == pytest.approx(125) and r['first_png_s'] == 12.0 and r['startup_s'] == pytest.approx(10.0)
    assert r['tail_s'] == pytest.approx(3.0) and r['projected_50k_s'] == pytest.approx(10 + 400 + 3)
    stopped = gpu_export.summarise(progress[:4], exit_s=14.5, n_target=1000, bs=250)   # stopped at the budget: no tail
    assert stopped['images_written'] == 500 and stopped['tail_s'] == 0 and stopped['images_per_sec'] == pytest.approx(125)
    assert gpu_export.summarise([(1.0, 0)], 2.0, 1000, 250) == {'images_written': 0}


def write_check_outputs(work, out):
    (work / 'steps.tsv').write_text(''.join(f'{n}\t{rc}\t{s}\t{b}\n' for n, rc, s, b in STEPS))
    (work / 'missing.txt').write_text('\n')
    (work / 'env.txt').write_text('nvidia-smi: not available\n')
    (out / 'junit.xml').write_text(JUNIT)
    runs = cuda_runs()
    (out / 'compare_reference.json').write_text(json.dumps({'complete': False, 'repeat': 3, 'runs': runs, 'sanity': None,
                                                            'summary': bench.summarise(runs, CUDA_ROWS)}))
    case = {'wall_ms_unprofiled': 240.0, 'launch_gaps_share': 0.3, 'top': [], 'categories': {'GEMM': {'ms': 100, 'share': 0.6}}}
    (out / 'profile.json').write_text(json.dumps({'cases': {'train_tokens_bf16': {'before': case, 'after': dict(case, wall_ms_unprofiled=120.0)},
                                                            'sample_fp16': {'before': {'status': 'failed: RuntimeError: x'}}}}))
    model = {'ckpt_off': {'measured': {'8': 9.0, '16': 13.0}, 'status': 'measured'},
             'ckpt_on': {'measured': {'8': None}, 'status': 'out of memory at batch 8'}}
    gpu_memory.fill_cards(model, {'24 GB': 24.0}, SimpleNamespace(margin_gib=1.5, verify_max_batch=0), None, lambda: True, lambda: None)
    (out / 'memory.json').write_text(json.dumps({'models': {'d16': model}}))


def test_summary_reports_every_step_and_every_figure(tmp_path):
    work, out = tmp_path / 'work', tmp_path / 'out'
    work.mkdir()
    out.mkdir()
    write_check_outputs(work, out)
    res = subprocess.run([sys.executable, str(REPO / 'tools' / 'gpu_check_summary.py'), f'--work={work}', f'--out={out}', '--device=cuda',
                          '--seconds=99'], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 1, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith('GPU CHECK: FAIL in 99s | ')
    for part in ('tests 1 passed, 1 failed, 1 skipped',
                 'compare vs the reference (median ratio, this code\'s img/s; 2/3 rounds, cut short): train_live_bf16 1.04x 133 img/s, '
                 'train_tokens_bf16_compiled 3.12x 400 img/s (target 3x met), sample_fp16_graphs 2.00x 237 img/s, '
                 'sample_fp16_compiled_graphs unavailable: utils.compile.compile_blocks cannot be imported',
                 'profile before->after: train_tokens_bf16 240->120 ms (gaps 30%->30%), sample_fp16 –->– ms',
                 'memory table: 1/2 configurations measured, 0 entries run, 1 from the fit (d16 ckpt_on: out of memory at batch 8)',
                 'compare timed out after 185s', 'memory failed (exit 1)', 'export not run: no time left'):
        assert part in line, part
    s = json.loads((out / 'summary.json').read_text())
    assert s['status'] == 'fail' and s['seconds'] == 99 and s['missing_packages'] == [] and 'nvidia-smi' in s['env_txt']
    assert [x['name'] for x in s['steps']] == [n for n, *_ in STEPS]
    assert s['tests']['failures'] == ['tests.test_cuda_amp::test_b: AssertionError: loss off']
    assert s['tests']['skip_reasons'] == {'xformers is not installed': 1}
    rows = {r['row']: r for r in s['compare']['rows']}
    assert rows['train_tokens_bf16_compiled']['reference_row'] == 'train_live_bf16'
    assert rows['train_tokens_bf16_compiled']['peak_gib'] == {'reference': 24.9, 'ours': 20.0}
    assert s['memory']['max_batch'] == {'d16 ckpt off': {'24 GB': 35}, 'd16 ckpt on': {'24 GB': None}}
    assert 'export' not in s and s['out_files']['within_limits'] and 'torch' in s and 'python' in s


@pytest.mark.parametrize('argv, message', [([], 'usage: tools/gpu_check.sh OUT_DIR'), (['out', '--device=tpu'], "unknown argument '--device=tpu'"),
                                           (['--device=cpu'], "OUT_DIR '--device=cpu' looks like a flag")])
def test_gpu_check_argument_errors(tmp_path, argv, message):
    res = subprocess.run([str(REPO / 'tools' / 'gpu_check.sh'), *argv], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and message in res.stderr
    assert not (tmp_path / 'out').exists()


def test_gpu_check_budgets_fit_the_lent_machine():
    """The CUDA steps' budgets and the summary's reserve add up to at most the 450 s default total."""
    text = (REPO / 'tools' / 'gpu_check.sh').read_text()
    cuda = text[text.index('if [ "$DEVICE" = cuda ]'):text.index('else', text.index('if [ "$DEVICE" = cuda ]'))]
    budgets = dict(kv.split('=') for kv in cuda.split('\n')[2].strip().split('; '))
    reserve = int(text.split('RESERVE=')[1].split()[0])
    assert 'GPU_CHECK_TOTAL_S:-450' in cuda and sum(map(int, budgets.values())) + reserve <= 450, budgets


@pytest.mark.parametrize('argv, message', [
    (['compare', f'--reference={REPO}', '--rows=train_live,nope'], f'error: --rows=train_live,nope: nope is not a row; give cpu, cuda or rows among'),
    (['train', '--budget_s=5'], 'error: --budget_s=5.0 applies to `bench.py compare --reference=DIR` only')])
def test_bench_compare_flag_errors(argv, message):
    res = subprocess.run([sys.executable, str(REPO / 'bench.py'), *argv], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().splitlines()[0].startswith(message), res.stderr[-2000:]


@pytest.mark.benchmark
def test_dry_run_on_the_cpu_end_to_end(tmp_path):
    """The whole check with --device=cpu: the CUDA tests skip, every measuring step runs at tiny sizes, summary.json is
    complete and OUT holds what comes back from a GPU machine (at most 8 files)."""
    env = dict(os.environ, VAR_REFERENCE_IMPL=os.environ.get('VAR_REFERENCE_IMPL', str(REPO)))   # this repo has the reference's API
    res = subprocess.run([str(REPO / 'tools' / 'gpu_check.sh'), str(tmp_path), '--device=cpu'], capture_output=True, text=True, cwd=REPO,
                         timeout=2400, env=env)
    line = res.stdout.strip().splitlines()[-1]
    assert res.returncode == 0 and line.startswith('GPU CHECK DRY RUN (cpu): PASS'), res.stdout[-3000:]
    s = json.loads((tmp_path / 'summary.json').read_text())
    assert s['status'] == 'pass' and s['dry_run'] and s['tests']['failed'] == 0 and s['tests']['passed'] == 0
    assert s['tests']['skipped'] >= 70 and any('needs an NVIDIA GPU' in r for r in s['tests']['skip_reasons'])
    assert [r['row'] for r in s['compare']['rows']] == list(bench.DEVICE_ROWS['cuda'])
    assert all(r['ratio_median'] is not None or r['status'].startswith('unavailable') for r in s['compare']['rows'])
    assert set(s['profile']['cases']) == set(gpu_profile.CASES) and s['memory']['configs'] == 4
    assert s['export']['status'] == 'measured' and s['export']['images_written'] == 10
    for part in ('compare vs the reference', 'profile before->after', 'memory table', 'export 10 images'):
        assert part in line, part
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(['summary.json', 'steps.log', 'pytest.log', 'junit.xml', 'profile.json', 'compare_reference.json',
                            'memory.json', 'export.json']) and s['out_files']['within_limits']
