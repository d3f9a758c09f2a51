"""Every script parses its flags one way (utils.flags.parse_dataclass): an unknown flag is a one-line error, --help works.

The scripts run as real processes, all at once (each mostly waits on `import torch`), so the module stays quick.
"""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import pytest

from conftest import REPO, script_env

BAD = '--no_such_flag=1'
# each script, with what it needs before a flag is looked at (its positional arguments, its subcommand)
SCRIPTS = {
    'train.py': ['train.py'], 'train_vae.py': ['train_vae.py'], 'extract_tokens.py': ['extract_tokens.py'],
    'sample.py': ['sample.py'], 'edit.py': ['edit.py'], 'demo.py': ['demo.py'],
    'evaluate.py': ['evaluate.py', 'ref.npz', 'samples.npz'], 'bench.py': ['bench.py', 'train'],
    'toy_data.py': ['-m', 'utils.toy_data', 'shapes'], 'make_demo_notebook.py': ['tools/make_demo_notebook.py'],
    'gpu_check_summary.py': ['tools/gpu_check_summary.py', '--work=w', '--out=o'],
    'consolidate_ckpt.py': ['tools/consolidate_ckpt.py', 'ar-ckpt-last.dcp'],
}
# --help of the scripts whose flags moved to dataclasses: flags that must be listed
HELP = {
    'evaluate.py': ['ref_npz', 'sample_npz', '--inception_weights', '--out_json', 'Inception Score splits'],
    'demo.py': ['--out', '--quick', '--seed', 'a seconds-long run with tiny models'],
    'bench.py': ['train', '--depth', '--reso {256,512}', '--reference DIR', '--threads', '--row'],
    'toy_data.py': ['root', '--train_per_class', '--gradient', '--bg_jitter'],
    'make_demo_notebook.py': ['--out', 'where to write the notebook'],
    'gpu_check_summary.py': ['--work DIR', '--out DIR', '--device', '--seconds'],
    'consolidate_ckpt.py': ['folder', '--out', '--overwrite', 'sharded checkpoint'],
}
# the positional arguments and the subcommand: a missing or wrong one is a one-line error naming it
POSITIONAL = {
    'evaluate.py one file': (['evaluate.py', 'ref.npz'], 'the following arguments are required: sample_npz'),
    'toy_data.py no root': (['-m', 'utils.toy_data', '--size=16'], 'the following arguments are required: root'),
    'bench.py misspelt subcommand': (['bench.py', 'trian'], "argument what: invalid choice: 'trian'"),
    'gpu_check_summary.py no --work': (['tools/gpu_check_summary.py', '--out=o'], 'the following arguments are required: --work'),
}


def _env(argv):
    # tools/ scripts run as tools/gpu_check.sh runs them: the repository is not on PYTHONPATH
    return script_env(PYTHONPATH='') if argv[0].startswith('tools/') else script_env()


def _run_cases(cwd):
    """Start every case at once; {case: [returncode, stdout, stderr]}."""
    cases = {f'bad {name}': argv + [BAD] for name, argv in SCRIPTS.items()}
    cases.update({f'help {name}': SCRIPTS[name][:2 if name == 'toy_data.py' else 1] + ['--help'] for name in HELP})
    cases.update({'help bench.py compare': ['bench.py', 'compare', '--help']})
    cases.update({f'positional {name}': argv for name, (argv, _) in POSITIONAL.items()})
    procs = {}
    for case, argv in cases.items():
        argv = [str(REPO / argv[0]) if argv[0].endswith('.py') else argv[0], *argv[1:]]
        procs[case] = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=_env(cases[case]), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    out = {}
    for case, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[case] = [p.returncode, stdout, stderr]
    return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """{case: CompletedProcess-like (returncode, stdout, stderr)}, the cases run once per pytest run: under pytest-xdist
    the first worker to get here runs them (~25 script start-ups) and writes the results; the others wait and read them."""
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get('PYTEST_XDIST_WORKER') else tmp_path_factory.getbasetemp()
    results, claim = shared / 'cli_style_runs.json', shared / 'cli_style_runs.claim'
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:   # another worker runs them
        deadline = time.monotonic() + 600
        while not results.exists():
            assert time.monotonic() < deadline, f'{results} never appeared'
            time.sleep(0.2)
    else:
        os.close(fd)
        cwd = tmp_path_factory.mktemp('cli')   # nothing a script might write lands in the repository
        out = {'error': 'the cases did not run'}   # what a waiting worker reads if this one fails: it fails at once too
        try:
            out = _run_cases(cwd)
        except BaseException as e:
            out = {'error': f'{type(e).__name__}: {e}'}
            raise
        finally:
            tmp = results.with_suffix('.tmp')
            tmp.write_text(json.dumps(out))
            os.replace(tmp, results)
    out = json.loads(results.read_text())
    assert 'error' not in out, f'running the cases failed in another worker: {out["error"]}'
    return {case: subprocess.CompletedProcess(None, *res) for case, res in out.items()}


@pytest.mark.parametrize('name', list(SCRIPTS))
def test_an_unknown_flag_is_a_one_line_error_naming_it(runs, name):
    res = runs[f'bad {name}']
    assert res.returncode == 2 and 'Traceback' not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [f'{name}: error: unrecognized arguments: {BAD} (--help lists the flags)']


@pytest.mark.parametrize('name', list(HELP))
def test_help_lists_the_flags(runs, name):
    res = runs[f'help {name}']
    assert res.returncode == 0 and res.stdout.startswith(f'usage: {name}'), res.stderr
    for text in HELP[name]:
        assert text in res.stdout, (text, res.stdout)


def test_help_after_a_bench_subcommand(runs):
    res = runs['help bench.py compare']
    assert res.returncode == 0 and '{train,sample,compare,cpu,side,fsdp}' in res.stdout and '--repeat' in res.stdout


@pytest.mark.parametrize('name', list(POSITIONAL))
def test_a_missing_or_wrong_positional_is_a_one_line_error(runs, name):
    res = runs[f'positional {name}']
    (line,) = res.stderr.strip().splitlines()
    assert res.returncode == 2 and POSITIONAL[name][1] in line and line.endswith('(--help lists the flags)')


def test_toy_data_positional_root_and_flags_reach_the_generator(tmp_path):
    res = subprocess.run([sys.executable, '-m', 'utils.toy_data', str(tmp_path / 'shapes'), '--train_per_class', '1',
                          '--val_per_class=1', '--size=16', '--n_shapes=1'], cwd=REPO, env=script_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / 'shapes' / 'train').iterdir()) == ['blue_circle', 'red_circle']
    assert len(list((tmp_path / 'shapes' / 'val' / 'red_circle').iterdir())) == 1


@dataclass
class _Args:
    src: str = field(metadata={'positional': True, 'help': 'the input'})
    must: int = field(metadata={'help': 'a required flag'})
    mode: str = field(default='a', metadata={'choices': ('a', 'b')})
    on: bool = False
    n: Optional[int] = None
    derived: int = field(default=0, metadata={'derived': True})


def test_parse_dataclass_fields_positional_required_choices_bool():
    from utils.flags import parse_dataclass
    a = parse_dataclass(_Args, ['in.txt', '--must=3', '--on', '--n', '5', '--mode=b'])
    assert a == _Args(src='in.txt', must=3, mode='b', on=True, n=5)
    assert parse_dataclass(_Args, ['--must', '1', 'x', '--on=0']) == _Args(src='x', must=1)


@pytest.mark.parametrize('argv, message', [
    (['x'], 'the following arguments are required: --must'), (['--must=1'], 'the following arguments are required: src'),
    (['x', '--must=1', '--mode=c'], "argument --mode: invalid choice: 'c'"), (['x', '--must=one'], "argument --must: invalid int value: 'one'"),
    (['x', '--must=1', '--derived=2'], 'unrecognized arguments: --derived=2'), (['x', '--must=1', '--mu=1'], 'unrecognized arguments: --mu=1'),
])
def test_parse_dataclass_errors_are_one_line(capsys, argv, message):
    from utils.flags import parse_dataclass
    with pytest.raises(SystemExit) as e:
        parse_dataclass(_Args, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
