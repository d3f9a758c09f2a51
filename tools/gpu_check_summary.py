"""The summary of tools/gpu_check.sh: OUT/summary.json and one line on stdout.

    python tools/gpu_check_summary.py --work=WORK --out=OUT --device=cuda --seconds=SECONDS

WORK holds steps.tsv (name, exit status or not_run, seconds, budget; one step a line), missing.txt and env.txt; OUT
holds junit.xml of the tests and the JSON of the measuring steps: profile.json (tools/gpu_profile.py),
compare_reference.json (bench.py compare --reference), memory.json (tools/gpu_memory.py), export.json
(tools/gpu_export.py). Each is read whenever it is there, also after its step failed or ran out of time (they are
written as the measurements come). Nothing here may stop the summary: a part that cannot be read is recorded as an
error. Exit status 0 when every step passed and no test failed.
"""
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == '__main__':   # run as tools/gpu_check_summary.py: the project's modules are one folder up
    sys.path.insert(0, REPO)
from utils.flags import flag, parse_dataclass  # noqa: E402  (standard library only)

# step name → the JSON it leaves in OUT
STEP_JSON = {'profile': 'profile.json', 'compare': 'compare_reference.json', 'memory': 'memory.json', 'export': 'export.json'}
OUT_LIMITS = {'files': 8, 'bytes': 16 * 2 ** 20}   # what comes back from the GPU machine
# the speed issue's targets: a row of this code against its reference row, median ratio at least this
TARGETS = {'train_tokens_bf16_compiled': 3.0}


def step_status(rc: str, seconds: int, budget: int) -> str:
    if rc == 'not_run':
        return 'not run: no time left'
    if rc in ('124', '137'):
        return f'timed out after {budget}s'
    return 'passed' if rc == '0' else f'failed (exit {rc})'


def read_steps(work: str) -> List[Dict]:
    steps = []
    with open(os.path.join(work, 'steps.tsv')) as f:
        for line in f:
            name, rc, seconds, budget = line.rstrip('\n').split('\t')
            steps.append({'name': name, 'status': step_status(rc, int(seconds), int(budget)), 'seconds': int(seconds), 'budget_s': int(budget)})
    return steps


def read_tests(junit: str) -> Dict:
    root = ET.parse(junit).getroot()
    out = {'passed': 0, 'failed': 0, 'errors': 0, 'skipped': 0, 'failures': [], 'skip_reasons': {}}
    for case in root.iter('testcase'):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case}
        if 'failure' in kinds or 'error' in kinds:
            key = 'failed' if 'failure' in kinds else 'errors'
            out[key] += 1
            msg = (kinds.get('failure') if 'failure' in kinds else kinds['error']).get('message', '')
            out['failures'].append(f'{name}: {msg.splitlines()[0] if msg else ""}'[:300])
        elif 'skipped' in kinds:
            out['skipped'] += 1
            reason = kinds['skipped'].get('message', '').replace('Skipped: ', '')[:200]
            out['skip_reasons'][reason] = out['skip_reasons'].get(reason, 0) + 1
        else:
            out['passed'] += 1
    return out


def read_compare(path: str) -> Dict:
    """bench.py compare --reference: per row of this code its median and best ratio against its reference row, images/s,
    peak memory, warm-up seconds and status; the sanity checks; whether every round ran."""
    with open(path) as f:
        data = json.load(f)
    rows, memory = [], {s['row']: s for s in data['summary'] if s['what'] != 'seconds'}
    for s in data['summary']:
        if s['what'] != 'seconds':
            continue
        m = memory.get(s['row'], {})
        rows.append({'row': s['row'], 'reference_row': s.get('reference_row', s['row']), 'status': s.get('status', 'measured'),
                     'ratio_median': s['ratio_median'], 'ratio_best': s['ratio_best'], 'images_per_sec': s.get('images_per_sec'),
                     'reference': s['reference'], 'ours': s['ours'], 'warmup_s': (s.get('warmup_s') or {}).get('ours'),
                     'peak_gib': {side: (m.get(side) or {}).get('median') for side in ('reference', 'ours')}})
    rounds = max((r['round'] + 1 for r in data.get('runs', []) if r.get('status', 'measured') == 'measured'), default=0)
    return {'complete': data.get('complete', True), 'rounds_measured': rounds, 'repeat': data.get('repeat'), 'rows': rows,
            'sanity': data.get('sanity')}


def read_profile(path: str) -> Dict:
    """tools/gpu_profile.py: per case and mode the step's milliseconds, launch gaps and category shares."""
    with open(path) as f:
        data = json.load(f)
    cases = {}
    for case, modes in data['cases'].items():
        cases[case] = {mode: ({'ms': r['wall_ms_unprofiled'], 'launch_gaps_share': r['launch_gaps_share'],
                               'shares': {c: v['share'] for c, v in r['categories'].items()}} if 'top' in r else {'status': r['status']})
                       for mode, r in modes.items()}
    return {'cases': cases}


def read_memory(path: str) -> Dict:
    """tools/gpu_memory.py: how many configurations were measured, the entries measured or fit, the table per card."""
    with open(path) as f:
        data = json.load(f)
    configs = [(name, key, m) for name, model in data['models'].items() for key, m in model.items()]
    entries = [e for _, _, m in configs for e in (m.get('max_batch') or {}).values() if e]
    table = {f"{name} ckpt {key.split('_')[1]}": {card: e and e['batch'] for card, e in (m.get('max_batch') or {}).items()}
             for name, key, m in configs}
    return {'configs': len(configs), 'configs_measured': sum(m['status'] == 'measured' for _, _, m in configs),
            'entries_measured': sum(e['how'] == 'measured' for e in entries), 'entries_fit': sum(e['how'] != 'measured' for e in entries),
            'problems': [f"{name} {key}: {m['status']}" for name, key, m in configs if m['status'] != 'measured'], 'max_batch': table}


def read_export(path: str) -> Dict:
    with open(path) as f:
        data = json.load(f)
    keep = ('status', 'images', 'images_written', 'images_per_sec', 'first_png_s', 'startup_s', 'tail_s', 'projected_50k_s',
            'cuda_graphs', 'total_s', 'command')
    return {k: data[k] for k in keep if k in data}


READERS: Dict[str, Callable[[str], Dict]] = {'profile': read_profile, 'compare': read_compare, 'memory': read_memory,
                                             'export': read_export}


def environment() -> Dict:
    env = {'python': platform.python_version()}
    try:
        import torch
        env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(card=p.name, card_memory_gib=round(p.total_memory / 2 ** 30, 1), compute_capability=f'{p.major}.{p.minor}',
                       cudnn=torch.backends.cudnn.version())
    except Exception as e:   # a broken torch is itself the finding
        env['torch_error'] = repr(e)
    try:
        smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            env['nvidia_smi'] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from models.attention import backend_status
        env['optional_attention'] = {b: backend_status(b)[0] or backend_status(b)[1] for b in ('flash', 'xformers')}
    except Exception as e:
        env['optional_attention'] = repr(e)
    return env


def _x(v: Optional[float]) -> str:
    return '–' if v is None else f'{v:.2f}x'


def fmt_compare(c: Dict) -> str:
    parts = []
    for r in c['rows']:
        ips = (r.get('images_per_sec') or {}).get('ours')
        if r['ratio_median'] is None:
            parts.append(f"{r['row']} {r['status'][:80]}")
        else:
            target = TARGETS.get(r['row'])
            parts.append(f"{r['row']} {_x(r['ratio_median'])} {ips:.0f} img/s" + ('' if r['status'] == 'measured' else ' (partly)')
                         + ('' if target is None else f" (target {target:g}x {'met' if r['ratio_median'] >= target else 'not met'})"))
    rounds = f"{c['rounds_measured']}/{c['repeat']} rounds" + ('' if c['complete'] else ', cut short')
    return f"compare vs the reference (median ratio, this code's img/s; {rounds}): " + ', '.join(parts)


def fmt_profile(p: Dict) -> str:
    parts = []
    for case, modes in p['cases'].items():
        ms = [f"{modes[m]['ms']:.0f}" if 'ms' in modes.get(m, {}) else '–' for m in ('before', 'after')]
        gaps = [f"{100 * modes[m]['launch_gaps_share']:.0f}%" if 'ms' in modes.get(m, {}) else '–' for m in ('before', 'after')]
        parts.append(f"{case} {ms[0]}->{ms[1]} ms (gaps {gaps[0]}->{gaps[1]})")
    return 'profile before->after: ' + ', '.join(parts)


def fmt_memory(m: Dict) -> str:
    return (f"memory table: {m['configs_measured']}/{m['configs']} configurations measured, {m['entries_measured']} entries run, "
            f"{m['entries_fit']} from the fit" + (f" ({'; '.join(m['problems'])[:200]})" if m['problems'] else ''))


def fmt_export(e: Dict) -> str:
    if 'projected_50k_s' not in e:
        return f"export: {e.get('status', '?')}"
    return (f"export {e['images_written']} images {e['images_per_sec']:.0f} img/s, 50k projected {e['projected_50k_s']:.0f} s "
            f"(startup {e['startup_s']:.0f} s, graphs {e['cuda_graphs'].split(':')[0]})" + ('' if e['status'] == 'measured' else f" [{e['status'][:80]}]"))


FORMATS = {'profile': fmt_profile, 'compare': fmt_compare, 'memory': fmt_memory, 'export': fmt_export}


def out_files(out: str) -> Dict:
    """OUT's files and their sizes, against what comes back from the GPU machine."""
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, out)] = os.path.getsize(p)
    too_big = [n for n, size in files.items() if size > OUT_LIMITS['bytes']]
    return {'files': files, 'within_limits': len(files) <= OUT_LIMITS['files'] and not too_big}


def write_json_atomic(obj, path: str) -> None:
    from utils.ckpt import write_bytes_atomic   # the repository is on sys.path (main puts it there)
    write_bytes_atomic(json.dumps(obj, indent=1).encode(), path)


def summarise(work: str, out: str, device: str, seconds: int) -> int:
    summary: Dict = {'device': device, 'dry_run': device != 'cuda', 'seconds': seconds, 'errors': []}
    summary.update(environment())
    for name, key in (('missing.txt', 'missing_packages'), ('env.txt', 'env_txt')):
        try:
            with open(os.path.join(work, name)) as f:
                text = f.read()
            summary[key] = text.split() if name == 'missing.txt' else text[-20000:]
        except OSError as e:
            summary['errors'].append(f'{name}: {e}')
    try:
        summary['steps'] = read_steps(work)
    except (OSError, ValueError) as e:
        summary['steps'] = []
        summary['errors'].append(f'steps.tsv: {e!r}')
    try:
        summary['tests'] = read_tests(os.path.join(out, 'junit.xml'))
    except (OSError, ET.ParseError) as e:
        summary['tests'] = None
        summary['errors'].append(f'junit.xml: {e!r}')
    found: Dict[str, Dict] = {}
    for s in summary['steps']:
        if s['name'] not in STEP_JSON:
            continue
        path = os.path.join(out, STEP_JSON[s['name']])
        if not os.path.isfile(path):
            continue
        try:   # also after the step failed or timed out: its JSON holds what was measured by then
            found[s['name']] = summary[s['name']] = READERS[s['name']](path)
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            note = f"unreadable {STEP_JSON[s['name']]}: {e!r}"[:300]
            s['status'] = f'failed ({note})' if s['status'] == 'passed' else f"{s['status']} ({note})"
    summary['out_files'] = out_files(out)

    ok = (bool(summary['steps']) and all(s['status'] == 'passed' for s in summary['steps']) and not summary['errors']
          and summary['tests'] is not None and summary['tests']['failed'] + summary['tests']['errors'] == 0)
    summary['status'] = 'pass' if ok else 'fail'
    write_json_atomic(summary, os.path.join(out, 'summary.json'))

    t = summary['tests']
    tests = 'tests: unreadable' if t is None else f"tests {t['passed']} passed, {t['failed'] + t['errors']} failed, {t['skipped']} skipped"
    bad = [f"{s['name']} {s['status']}" for s in summary['steps'] if s['status'] != 'passed']
    parts = []
    for name in STEP_JSON:
        if name in found:
            try:
                parts.append(FORMATS[name](found[name]))
            except (KeyError, TypeError, ValueError) as e:
                parts.append(f'{name}: unprintable ({e!r})'[:200])
    where = summary.get('card', 'no GPU') + f", torch {summary.get('torch', '?')}, CUDA {summary.get('cuda', '-')}"
    kind = 'GPU CHECK' if device == 'cuda' else 'GPU CHECK DRY RUN (cpu)'
    print(f"{kind}: {summary['status'].upper()} in {seconds}s | {where} | {tests} | " + ' | '.join(parts + bad)
          + f" | {os.path.join(out, 'summary.json')}")
    return 0 if ok else 1


@dataclass
class SummaryArgs:
    """Flags of tools/gpu_check_summary.py (all given by tools/gpu_check.sh)."""
    work: str = flag(help="gpu_check.sh's scratch folder: steps.tsv, missing.txt, env.txt", metavar='DIR', group='data')
    out: str = flag(help="gpu_check.sh's OUT_DIR: junit.xml and the measuring steps' JSON; summary.json is written there",
                    metavar='DIR', group='output')
    device: str = flag('cuda', 'cuda: the GPU check; cpu: its dry run (small sizes, the CUDA tests skipped)', group='environment')
    seconds: int = flag(0, 'how long the whole check took, recorded in the summary', group='logging')


def main(argv: Optional[Sequence[str]] = None) -> None:
    a = parse_dataclass(SummaryArgs, argv, description=__doc__.splitlines()[0])
    try:
        rc = summarise(a.work, a.out, a.device, a.seconds)
    except Exception:   # gpu_check.sh prints its own one-line summary for exit status > 1
        import traceback
        traceback.print_exc()
        rc = 3
    sys.exit(rc)


if __name__ == '__main__':
    main()
