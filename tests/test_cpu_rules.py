"""cpu_kernels/cpu_rules.py and cpu_kernels/threads.py: the CPU is read from /proc/cpuinfo, one table picks the
CPU-dependent fast paths, and where it picks Winograd a short OpenMP idle spin is advised; libgomp takes that spin from
the environment it starts with and not from a change made after PyTorch loads, which is why no script or package sets
it (a real libgomp, checked by the CPU time its idle worker burns)."""
import ast
import json
import os
import subprocess
import sys

import pytest

from cpu_kernels import cpu_rules, threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPUINFO_SPR = 'processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\nvendor_id\t: Other\n'


def test_cpu_features_are_read_from_the_first_processor_of_proc_cpuinfo():
    f = cpu_rules.parse_cpuinfo(CPUINFO_SPR, cores=2)
    assert f == cpu_rules.CpuFeatures('GenuineIntel', frozenset({'fpu', 'sse', 'avx2', 'avx512f', 'amx_bf16', 'amx_tile'}), 2)
    assert cpu_rules.parse_cpuinfo('', cores=4) == cpu_rules.CpuFeatures('', frozenset(), 4)   # not Linux: no flags
    assert cpu_rules.read_cpu_features() == cpu_rules.read_cpu_features()                     # no timing: the same read


@pytest.mark.parametrize('vendor, flags, cores, onednn, winograd, c_attention, cpus', [
    ('AuthenticAMD', 'avx2 avx512f avx512_bf16', 2, True, True, True, 'AMD with avx512f, <= 8 cores'),   # every CPU-chosen kernel on
    ('AuthenticAMD', 'avx2 avx512f', 8, True, True, True, 'AMD with avx512f, <= 8 cores'),
    ('AuthenticAMD', 'avx2 avx512f', 64, False, False, False, 'AMD with avx512f, > 8 cores'),
    ('GenuineIntel', 'avx2 avx512f avx512_bf16 amx_bf16 amx_tile', 2, False, False, False, 'AMX'),   # an Intel CPU with AMX
    ('GenuineIntel', 'avx2 avx512f', 2, False, False, False, 'Intel with avx512f, no AMX'),
    ('AuthenticAMD', 'avx2', 2, False, False, False, 'avx2 without avx512f'),
    ('GenuineIntel', 'avx2', 16, False, False, False, 'avx2 without avx512f'),
    ('', '', 2, False, False, False, 'other CPUs'),
])
def test_cpu_rule_table_picks_the_kernels_by_vendor_isa_and_cores(vendor, flags, cores, onednn, winograd, c_attention, cpus):
    features = cpu_rules.CpuFeatures(vendor, frozenset(flags.split()), cores)
    rule = cpu_rules.rule_for(features)
    assert (rule.onednn_linear, rule.winograd, rule.c_attention, rule.cpus) == (onednn, winograd, c_attention, cpus) and rule.why
    assert 'not measured' in rule.why or (onednn and winograd and c_attention)   # where nothing was measured: the plain kernels
    assert not rule.c_attention or 'avx512f' in features.flags   # the C kernel is AVX-512 code
    # the short OpenMP spin is advised with Winograd, and the user's own setting always wins
    assert threads.openmp_spin_env(features, environ={}) == ({'GOMP_SPINCOUNT': str(threads.SHORT_SPIN_COUNT)} if winograd else {})
    for users in ({'GOMP_SPINCOUNT': '300000'}, {'OMP_WAIT_POLICY': 'PASSIVE'}):
        assert threads.openmp_spin_env(features, environ=users) == {}


_PROBE = r'''
import json, os, sys, time
sys.path.insert(0, {repo!r})
from cpu_kernels.threads import openmp_spin_env
set_here = {{k: os.environ[k] for k in ('GOMP_SPINCOUNT',) if k in os.environ}}
import torch
torch.set_num_threads(2)
x = torch.randn(200_000)    # one parallel region per op: 2 threads, little work


def idle_ticks():   # CPU clock ticks of every thread but this one (libgomp's worker)
    total = 0
    for tid in os.listdir('/proc/self/task'):
        if int(tid) != os.getpid():
            stat = open(f'/proc/self/task/{{tid}}/stat').read().rsplit(')', 1)[1].split()
            total += int(stat[11]) + int(stat[12])
    return total


def spin_ticks():
    for _ in range(3):
        x.add(1)
    before = idle_ticks()
    for _ in range(40):          # a region, then 20 ms with nothing to do
        x.mul(1.0001)
        time.sleep(0.02)
    return idle_ticks() - before


ticks = spin_ticks()
advice = openmp_spin_env(environ={{}})   # what the rule advises for this CPU
os.environ.update(advice)                # set after PyTorch loaded: libgomp has read its settings already
print(json.dumps({{'set': set_here, 'ticks': ticks, 'advice': advice, 'after': spin_ticks()}}))
'''


def _probe(shorten: bool, fake_amd: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY', 'OMP_NUM_THREADS')}
    if shorten:   # the user's environment, before Python starts
        env['GOMP_SPINCOUNT'] = str(threads.SHORT_SPIN_COUNT)
    code = _PROBE.format(repo=REPO)
    if fake_amd:   # this check is about libgomp, not this machine's CPU: read the AMD rule
        code = code.replace('from cpu_kernels.threads import', 'import cpu_kernels.cpu_rules as r; r.read_cpu_features = lambda: '
                            'r.CpuFeatures("AuthenticAMD", frozenset({"avx2", "avx512f"}), 2)\nfrom cpu_kernels.threads import')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='libgomp spins only with a second core for its worker')
def test_the_short_spin_reaches_libgomp_from_the_environment_and_not_after_torch_loads():
    plain = _probe(shorten=False, fake_amd=True)
    short = _probe(shorten=True, fake_amd=True)
    # libgomp's default: the idle worker spins after each of the 40 regions, ticks of CPU time every time
    if plain['ticks'] < 10:
        pytest.skip(f"libgomp's default spin did not show here ({plain['ticks']} ticks): nothing to shorten")
    assert short['set'] == {'GOMP_SPINCOUNT': str(threads.SHORT_SPIN_COUNT)} and plain['set'] == {}
    assert short['ticks'] <= plain['ticks'] // 4, (short, plain)   # the short spin: a fraction of that
    assert plain['advice'] == {'GOMP_SPINCOUNT': str(threads.SHORT_SPIN_COUNT)}   # the AMD rule advises it ...
    assert plain['after'] > 2 * short['ticks'], (short, plain)     # ... but set once PyTorch is loaded it changes nothing


def test_no_script_sets_openmp_before_importing_torch():
    """The scripts start with their imports: the CPU package owns its settings, and libgomp's spin is the user's (above)."""
    for script in ('train.py', 'sample.py', 'extract_tokens.py', 'edit.py', 'train_vae.py', 'demo.py', 'bench.py'):
        source = open(os.path.join(REPO, script)).read()
        body = ast.parse(source).body
        first_import = next(i for i, node in enumerate(body) if isinstance(node, (ast.Import, ast.ImportFrom, ast.If)))
        node = body[first_import]
        assert isinstance(node, (ast.Import, ast.ImportFrom)), script
        assert 'shorten_openmp_spin_for_nnpack' not in source and "environ['GOMP_SPINCOUNT']" not in source, script
    cell = ''.join(json.load(open(os.path.join(REPO, 'demo_sample.ipynb')))['cells'][1]['source'])
    assert 'shorten_openmp_spin_for_nnpack' not in cell and 'GOMP_SPINCOUNT' not in cell
