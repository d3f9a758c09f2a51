"""The README and docs/*.md cannot go stale: every command of a project script uses flags the script has, every relative
link and anchor resolves, the README stays a starting page (at most 16 KB), and its five-line sampling snippet runs."""
import dataclasses
import functools
import importlib
import re
import shlex
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, NamedTuple, Tuple

import pytest
import torch

from conftest import REPO, TINY

README = REPO / 'README.md'
README_MAX_BYTES = 16384
DOCS = [README] + sorted((REPO / 'docs').glob('*.md'))

# script -> the dataclass whose fields are its flags (the name the script itself imports or defines)
SCRIPT_FLAGS = {'train.py': 'Args', 'train_vae.py': 'VAEArgs', 'extract_tokens.py': 'ExtractArgs', 'sample.py': 'SampleArgs',
                'edit.py': 'EditArgs', 'evaluate.py': 'EvaluateArgs', 'demo.py': 'DemoArgs', 'bench.py': 'BenchArgs'}
SCRIPT_RE = re.compile(r'(?:^|/)(' + '|'.join(re.escape(s) for s in SCRIPT_FLAGS) + r')$')
NOT_SHELL = {'python', 'py', 'json', 'yaml', 'toml'}   # fenced blocks whose text is not a command line
SHELL_SEPARATORS = {'|', '||', '&', '&&', ';', '>', '>>', '<', '(', ')'}
LINK_RE = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')


class Snippet(NamedTuple):
    doc: Path
    line: int     # 1-based line where it starts
    text: str
    shell: bool   # a fenced block of command lines (line continuations joined), else an inline code span


def rel(doc: Path) -> str:
    return str(doc.relative_to(REPO))


@functools.lru_cache(maxsize=None)
def script_flags(script: str) -> FrozenSet[str]:
    """The --flags `script` parses: the fields of its flag dataclass, as utils.flags.parse_dataclass turns them into flags."""
    cls = getattr(importlib.import_module(script[:-3]), SCRIPT_FLAGS[script])
    assert dataclasses.is_dataclass(cls), f'{script}: {SCRIPT_FLAGS[script]} is not a dataclass'
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get('derived') and not f.metadata.get('positional')]
    return frozenset(f.name for f in fields) | {'help'}


def snippets(doc: Path) -> Iterator[Snippet]:
    """Fenced code blocks (each logical line, continuations joined) and inline code spans (of whole paragraphs, so a span may
    wrap) of one Markdown file."""
    lines = doc.read_text(encoding='utf-8').splitlines()
    fence, lang, para, para_start, pending, pending_start = None, '', [], 0, '', 0
    for no, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and re.match(r'^(```|~~~)', stripped):
            yield from _spans(doc, para_start, para)
            para, fence, lang = [], stripped[:3], stripped[3:].strip().lower()
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
                continue
            if lang in NOT_SHELL:
                continue
            if not pending:
                pending_start = no
            if line.rstrip().endswith('\\'):
                pending += line.rstrip()[:-1] + ' '
                continue
            yield Snippet(doc, pending_start, pending + line, True)
            pending = ''
            continue
        if not stripped:
            yield from _spans(doc, para_start, para)
            para = []
            continue
        if not para:
            para_start = no
        para.append(line)
    yield from _spans(doc, para_start, para)


def _spans(doc: Path, start: int, para: List[str]) -> Iterator[Snippet]:
    text = '\n'.join(para)
    for m in re.finditer(r'(`+)(.+?)\1', text, flags=re.S):
        yield Snippet(doc, start + text.count('\n', 0, m.start()), ' '.join(m.group(2).split()), False)


def _tokens(text: str) -> List[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = '#'
    try:
        return list(lexer)
    except ValueError:   # an unbalanced quote in prose: whitespace is enough to find flags
        return text.split()


def script_commands(snippet: Snippet) -> Iterator[Tuple[str, Dict[str, str]]]:
    """(script, {flag name: value ('' when none follows '=')}) for every run of a project script in the snippet
    (`python|torchrun ... sample.py --x=1`, or the script named with its flags in a sentence's code span)."""
    tokens = _tokens(snippet.text)
    for i, tok in enumerate(tokens):
        m = SCRIPT_RE.search(tok)
        if not m:
            continue
        flags = {}
        for arg in tokens[i + 1:]:
            if arg in SHELL_SEPARATORS or SCRIPT_RE.search(arg):
                break
            if arg.startswith('--') and len(arg) > 2:
                name, _, value = arg[2:].partition('=')
                flags[name] = value
        yield m.group(1), flags


def all_commands() -> List[Tuple[Snippet, str, Dict[str, str]]]:
    return [(s, script, flags) for doc in DOCS for s in snippets(doc) for script, flags in script_commands(s)]


def github_anchor(heading: str, seen: Dict[str, int]) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens, -1, -2 ... for repeats."""
    text = re.sub(r'`|\*\*|\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip()).lower()
    slug = re.sub(r'[^\w\- ]', '', text).replace(' ', '-')
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    return slug if n == 0 else f'{slug}-{n}'


@functools.lru_cache(maxsize=None)
def anchors(doc: Path) -> FrozenSet[str]:
    seen: Dict[str, int] = {}
    out, in_fence = set(), False
    for line in doc.read_text(encoding='utf-8').splitlines():
        if re.match(r'^\s*(```|~~~)', line):
            in_fence = not in_fence
        elif not in_fence and re.match(r'^#{1,6} ', line):
            out.add(github_anchor(line.lstrip('#'), seen))
    return frozenset(out)


# ------------------------------------------------------------------ the tests
def test_the_extraction_finds_commands_flags_and_links(tmp_path):
    """The parser sees what a reader sees: continued lines, torchrun's own flags apart, comments, inline spans."""
    doc = tmp_path / 'x.md'
    doc.write_text('Run `python sample.py --cfg=2 --top_k 5` or\n`edit.py\n--box=0,0,1,1`.\n\n```bash\n'
                   'torchrun --nproc_per_node=8 train.py --depth=16 \\\n    --bs=8   # --not_a_flag\n'
                   'python bench.py compare --repeat=3 && tensorboard --logdir=x\n```\n\n```python\nx = "train.py --nope"\n```\n')
    found = [(s.line, script, flags) for s in snippets(doc) for script, flags in script_commands(s)]
    assert found == [(1, 'sample.py', {'cfg': '2', 'top_k': ''}), (2, 'edit.py', {'box': '0,0,1,1'}),
                     (6, 'train.py', {'depth': '16', 'bs': '8'}), (8, 'bench.py', {'repeat': '3'})]
    assert github_anchor('Sample in five lines', {}) == 'sample-in-five-lines'
    assert github_anchor('Fully sharded training: `--fsdp=1`', {}) == 'fully-sharded-training---fsdp1'


def test_every_flag_of_a_documented_command_exists():
    commands = all_commands()
    assert len(commands) > 20, f'only {len(commands)} script commands found in README.md and docs/*.md'
    assert {script for _, script, _ in commands} >= {'train.py', 'sample.py', 'train_vae.py', 'evaluate.py'}
    stale = sorted({f'{rel(s.doc)}:{s.line}: {script} has no --{flag} (in: {s.text.strip()[:120]})'
                    for s, script, flags in commands for flag in flags if flag not in script_flags(script)})
    assert not stale, 'documented commands use flags their script does not have:\n' + '\n'.join(stale)


def test_ema_weights_are_asked_for_only_where_a_run_keeps_them():
    """`sample.py/edit.py --ema=1` reads the EMA weights that only `train.py --ema=<decay>` keeps: a page that asks for them
    must train with an EMA (or say that its run needs one), or its sampling command fails on the run its own training
    command makes."""
    def on(value: str) -> bool:
        return value.lower() in ('', '1', 'true', 'yes', 'y', 'on')
    wrong = []
    for doc in DOCS:
        commands = [(s, script, flags) for s in snippets(doc) for script, flags in script_commands(s)]
        # `train.py --ema=0.9999`, or `--ema` named without a value in a sentence ('trained with `train.py --ema>0`')
        keeps_ema = any(script == 'train.py' and flags.get('ema', '0') not in ('0', '0.0') for _, script, flags in commands)
        wrong += [f'{rel(doc)}:{s.line}: {s.text.strip()[:120]}' for s, script, flags in commands
                  if script in ('sample.py', 'edit.py') and 'ema' in flags and on(flags['ema']) and not keeps_ema]
    assert not wrong, ('--ema=1 asks for EMA weights, but no train.py command of the same page keeps them (train.py --ema is 0, '
                       'off, by default):\n' + '\n'.join(wrong))


def test_readme_is_a_starting_page():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (f'README.md is {size} bytes, over {README_MAX_BYTES}: move the detail into a docs/ page and '
                                      'link it')


def test_no_doc_speaks_of_sessions():
    hits = [f'{rel(doc)}:{no}: {line.strip()[:100]}' for doc in DOCS
            for no, line in enumerate(doc.read_text(encoding='utf-8').splitlines(), 1) if re.search(r'session', line, re.I)]
    assert not hits, 'the docs speak of the project, its runs and dates, never of "sessions":\n' + '\n'.join(hits)


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in DOCS:
        for no, line in enumerate(doc.read_text(encoding='utf-8').splitlines(), 1):
            for target in LINK_RE.findall(line):
                if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):   # https:, mailto:, ...
                    continue
                path, _, anchor = target.partition('#')
                dest = (doc.parent / path).resolve() if path else doc
                if not dest.exists():
                    broken.append(f'{rel(doc)}:{no}: {target} (no file {path})')
                elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
                    broken.append(f'{rel(doc)}:{no}: {target} (no heading #{anchor} in {dest.name})')
    assert not broken, 'links that lead nowhere:\n' + '\n'.join(broken)


def readme_sampling_snippet() -> str:
    text = README.read_text(encoding='utf-8')
    blocks = re.findall(r'```python\n(.*?)```', text, flags=re.S)
    quick = [b for b in blocks if 'load_pretrained' in b]
    assert quick, 'README.md has no ```python block with load_pretrained (the sampling quick start)'
    return quick[0]


def test_the_readme_sampling_snippet_runs(tmp_path, monkeypatch):
    """The README's sampling snippet, run as written, on a tiny model served as the published files of the Hub repo."""
    import huggingface_hub

    import models
    from models import build_vae_var
    code = readme_sampling_snippet()
    assert len([line for line in code.splitlines() if line.strip()]) <= 5, 'the quick start promises five lines:\n' + code
    tiny = dict(TINY, V=1024, num_classes=1000, flash_if_available=False, fused_if_available=False)   # top_k=900, ImageNet labels
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', **tiny)
    hub = tmp_path / 'hub'
    hub.mkdir()
    torch.save(vae.state_dict(), hub / 'vae_ch160v4096z32.pth')
    torch.save(var.state_dict(), hub / 'var_d16.pth')
    asked = []

    def hf_hub_download(repo_id, filename, **kwargs):   # the network, answered from the folder
        asked.append((repo_id, filename))
        return str(hub / filename)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', hf_hub_download)
    monkeypatch.setattr(models, 'load_pretrained', functools.partial(models.load_pretrained, build_kwargs=tiny))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, 'README.md', 'exec'), scope)
    assert set(asked) == {('FoundationVision/var', 'var_d16.pth'), ('FoundationVision/var', 'vae_ch160v4096z32.pth')}
    images = scope['images']
    assert images.shape == (4, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    written = [p for p in tmp_path.iterdir() if p.suffix == '.png']
    assert written, 'the snippet saves no image'
    from PIL import Image
    assert Image.open(written[0]).size[0] >= 64
