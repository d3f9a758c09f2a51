"""--help teaches: every flag of every user-facing script has a line of help, listed under a heading of utils.flags.GROUPS.

The scripts' --help (and bench.py's after each subcommand) run as real processes, all at once, since each mostly waits on
`import torch`; one test reads them all, so that under pytest-xdist only one worker starts them. The flag dataclasses are
also checked in-process, field by field, and parse_dataclass's headings on a small dataclass of its own.
"""
import dataclasses
import importlib
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest

from conftest import REPO, script_env

BENCH_SUBCOMMANDS = ('train', 'sample', 'compare', 'cpu', 'side', 'fsdp')
# case → the command line before --help
HELP_CASES = {
    'train.py': ['train.py'], 'train_vae.py': ['train_vae.py'], 'extract_tokens.py': ['extract_tokens.py'],
    'sample.py': ['sample.py'], 'edit.py': ['edit.py'], 'evaluate.py': ['evaluate.py'], 'demo.py': ['demo.py'],
    'bench.py': ['bench.py'], **{f'bench.py {c}': ['bench.py', c] for c in BENCH_SUBCOMMANDS}, 'bench_fsdp.py': ['bench_fsdp.py'],
    'utils.toy_data': ['-m', 'utils.toy_data'], 'tools/consolidate_ckpt.py': ['tools/consolidate_ckpt.py'],
    'tools/gpu_check_summary.py': ['tools/gpu_check_summary.py'], 'tools/make_demo_notebook.py': ['tools/make_demo_notebook.py'],
}
# (module, class): every dataclass whose fields are a script's flags
FLAG_CLASSES = [('utils.arg_util', 'Args'), ('utils.arg_util', 'VAEArgs'), ('utils.arg_util', 'ExtractArgs'),
                ('utils.arg_util', 'ModelFlags'), ('sample', 'SampleArgs'), ('edit', 'EditArgs'), ('evaluate', 'EvaluateArgs'),
                ('demo', 'DemoArgs'), ('bench', 'BenchArgs'), ('bench_fsdp', 'WorkerArgs'), ('utils.toy_data', 'ToyDataArgs'),
                ('tools.consolidate_ckpt', 'ConsolidateArgs'), ('tools.gpu_check_summary', 'SummaryArgs'),
                ('tools.make_demo_notebook', 'NotebookArgs'), ('tools.gpu_profile', 'ProfileArgs'), ('tools.gpu_memory', 'MemoryArgs'),
                ('tools.gpu_export', 'ExportArgs')]

_HEADING = re.compile(r'^(\S.*):$')
_OPTION = re.compile(r'^  (?:-\w, )?(--[\w-]+)(?: \S+)?(?:\s{2,}(\S.*))?$')      # "  --name METAVAR   text"
_POSITIONAL = re.compile(r'^  ([^\s-]\S*)(?:\s{2,}(\S.*))?$')                     # "  name   text"
_CONTINUED = re.compile(r'^\s{3,}(\S.*)$')
_DEFAULT = re.compile(r'\s*\(default: [^()]*(\([^()]*\)[^()]*)*\)$')


def parse_help(text: str) -> Tuple[List[str], Dict[str, Tuple[Optional[str], str]]]:
    """(the --flags of the usage lines, {argument: (its heading, its help text without the default)}) of a --help page."""
    lines = text.splitlines()
    end = lines.index('') if '' in lines else len(lines)   # the usage block ends at the first blank line
    usage = re.findall(r'(--[\w-]+)', ' '.join(lines[:end]))
    entries: Dict[str, List] = {}
    heading, current = None, None
    for line in lines[end:]:
        m = _HEADING.match(line)
        if m or (line and not line[0].isspace()):   # a heading, or the description's text: not an argument's
            heading, current = (m.group(1) if m else None), None
            continue
        m = _OPTION.match(line) or _POSITIONAL.match(line)
        if m:
            current = m.group(1)
            entries[current] = [heading, [m.group(2) or '']]
        elif current and _CONTINUED.match(line):
            entries[current][1].append(_CONTINUED.match(line).group(1))
        else:
            current = None
    return usage, {name: (h, _DEFAULT.sub('', ' '.join(t for t in texts if t)).strip()) for name, (h, texts) in entries.items()}


def help_problems(text: str, groups) -> List[str]:
    """What is wrong with a --help page: a flag of the usage lines not explained, without help, or not under a group heading."""
    usage, entries = parse_help(text)
    out = [f'{flag}: in the usage line but not listed' for flag in usage if flag not in entries]
    for name, (heading, desc) in entries.items():
        if name == '--help':
            continue
        if not desc:
            out.append(f'{name}: no help text')
        if name.startswith('--') and heading not in groups:
            out.append(f'{name}: under the heading {heading!r}, not one of utils.flags.GROUPS')
    return out


def _run_all(cwd) -> Dict[str, subprocess.CompletedProcess]:
    procs = {}
    for case, argv in HELP_CASES.items():
        # tools/ scripts run as tools/gpu_check.sh runs them: the repository is not on PYTHONPATH
        env = script_env(COLUMNS='100', **({'PYTHONPATH': ''} if argv[0].startswith('tools/') else {}))
        cmd = [sys.executable, str(REPO / argv[0]) if argv[0].endswith('.py') else argv[0], *argv[1:], '--help']
        procs[case] = (cmd, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = {}
    for case, (cmd, p) in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[case] = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    return out


def test_every_flag_of_every_script_has_help_under_a_group_heading(tmp_path):
    from utils.flags import GROUPS
    problems = []
    for case, res in _run_all(tmp_path).items():
        if res.returncode != 0 or not res.stdout.startswith('usage: '):
            problems.append(f'{case} --help: exit {res.returncode}, {res.stderr.strip()[-500:]}')
            continue
        _, entries = parse_help(res.stdout)
        assert len(entries) >= 2, (case, res.stdout)   # --help and at least one argument were read from the page
        problems += [f'{case}: {p}' for p in help_problems(res.stdout, GROUPS)]
    assert not problems, '\n'.join(problems)


def test_bench_subcommands_are_the_ones_checked():
    from bench import BenchArgs
    (what,) = [f for f in dataclasses.fields(BenchArgs) if f.name == 'what']
    assert tuple(what.metadata['choices']) == BENCH_SUBCOMMANDS


@pytest.mark.parametrize('module, name', FLAG_CLASSES)
def test_every_field_of_a_flag_dataclass_has_help_and_a_group(module, name):
    from utils.flags import GROUPS
    cls = getattr(importlib.import_module(module), name)
    problems = []
    for f in dataclasses.fields(cls):
        if f.metadata.get('derived'):
            continue
        text = f.metadata.get('help', '')
        if not text.strip() or '\n' in text:
            problems.append(f'{f.name}: help {text!r} is not one non-empty line')
        if not f.metadata.get('positional') and f.metadata.get('group') not in GROUPS:
            problems.append(f'{f.name}: group {f.metadata.get("group")!r} is not one of utils.flags.GROUPS')
    assert not problems, f'{module}.{name}: ' + '; '.join(problems)


def test_parse_help_reads_headings_options_positionals_and_continued_lines():
    page = ('usage: x.py [-h] [--a INT] [--b [BOOL]] [--c STR] src\n\nWhat x does: a line of description.\n\n'
            'positional arguments:\n  src         the input\n\noptions:\n  -h, --help  show this help message and exit\n'
            '  --c STR\n\nmodel:\n  --a INT     the first (default: 1)\n  --b [BOOL]  a long text that goes on\n'
            '              over two lines (default: False)\n')
    usage, entries = parse_help(page)
    assert usage == ['--a', '--b', '--c']
    assert entries == {'src': ('positional arguments', 'the input'), '--help': ('options', 'show this help message and exit'),
                       '--c': ('options', ''), '--a': ('model', 'the first'),
                       '--b': ('model', 'a long text that goes on over two lines')}
    assert help_problems(page, ('model',)) == ["--c: no help text", "--c: under the heading 'options', not one of utils.flags.GROUPS"]
    assert help_problems(page.replace('  --c STR\n', ''), ('model',)) == ['--c: in the usage line but not listed']


@dataclass
class _Grouped:
    src: str = dataclasses.field(metadata={'positional': True, 'help': 'the input'})
    need: float = dataclasses.field(metadata={'help': 'a required flag', 'group': 'data'})
    late: int = dataclasses.field(default=1, metadata={'help': 'in a later group', 'group': 'environment'})
    plain: int = dataclasses.field(default=2, metadata={'help': 'no group'})
    first: str = dataclasses.field(default='', metadata={'help': 'in the first group: 50% of it', 'group': 'data'})
    on: bool = dataclasses.field(default=True, metadata={'help': 'a switch', 'group': 'environment'})


def test_help_lists_groups_in_the_order_of_GROUPS_with_defaults(capsys, monkeypatch):
    from utils.flags import parse_dataclass
    monkeypatch.setenv('COLUMNS', '100')
    with pytest.raises(SystemExit) as e:
        parse_dataclass(_Grouped, ['--help'])
    page = capsys.readouterr().out
    assert e.value.code == 0
    _, entries = parse_help(page)
    assert entries == {'src': ('positional arguments', 'the input'), '--help': ('options', 'show this help message and exit'),
                       '--plain': ('options', 'no group'), '--first': ('data', 'in the first group: 50% of it'),
                       '--need': ('data', 'a required flag'), '--late': ('environment', 'in a later group'),
                       '--on': ('environment', 'a switch')}
    headings = [line[:-1] for line in page.splitlines() if _HEADING.match(line)]
    assert headings == ['positional arguments', 'options', 'data', 'environment']
    assert "in the first group: 50% of it (default: '')" in page and 'a switch (default: True)' in page
    assert 'a required flag\n' in page   # a required flag has no default to show
    assert '--late INT' in page and '--on [BOOL]' in page and '--need FLOAT' in page
    # the grouping changes nothing of the parsing
    assert parse_dataclass(_Grouped, ['x', '--need=0.5', '--on=0']) == _Grouped(src='x', need=0.5, on=False)


def test_flag_refuses_an_unknown_group_and_a_second_line():
    from utils.flags import flag
    with pytest.raises(ValueError, match="'data loading' is not one of"):
        flag(1, 'help', group='data loading')
    with pytest.raises(ValueError, match='one line'):
        flag(1, 'two\nlines', group='data')
    f = dataclasses.make_dataclass('F', [('n', int, flag(help='from the machine', default_factory=lambda: 3, group='environment'))])
    assert f().n == 3
