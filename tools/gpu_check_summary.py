"""The summary of tools/gpu_check.sh: OUT/summary.json and one line on stdout.

    python tools/gpu_check_summary.py --work=WORK --out=OUT --device=cuda --seconds=SECONDS

WORK holds steps.tsv (name, exit status or not_run, seconds, budget; one step a line), one NAME.json per
bench step (bench.py's --json line) and missing.txt; OUT holds junit.xml of the tests. Nothing here may
stop the summary: a part that cannot be read is recorded as an error. Exit status 0 when every step passed.
"""
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == '__main__':   # run as tools/gpu_check_summary.py: the project's modules are one folder up
    sys.path.insert(0, REPO)
from utils.flags import flag, parse_dataclass  # noqa: E402  (standard library only)

MEASURED = ('images_per_sec', 'peak_memory_gb', 'peak_memory_reserved_gb', 'final_loss', 'seconds', 'device_name')


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


def read_measurement(path: str) -> Dict:
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    r = json.loads(lines[-1])
    m = {k: r[k] for k in ('what', 'depth', 'bs', 'reso', 'dtype', 'tf32', 'steps', 'device') if k in r}
    m.update({k: r[k] for k in MEASURED if k in r})
    s = r.get('seconds', {})
    if r.get('what') == 'train' and 'tokenise' in s and s['total'] > s['tokenise']:
        m['images_per_sec_from_tokens'] = r['bs'] / (s['total'] - s['tokenise'])   # as with pre-extracted tokens
    return m


REFERENCE_STEP = 'reference_compare'   # bench.py compare --reference: its JSON in OUT, not a NAME.json in WORK


def read_reference_compare(path: str) -> List[Dict]:
    """The rows of bench.py compare --reference's table: best/median of each side, the ratios, images/s."""
    with open(path) as f:
        rows = json.load(f)['summary']
    keep = ('row', 'what', 'title', 'unit', 'ratio_best', 'ratio_median', 'images_per_sec')
    return [dict({k: r[k] for k in keep if k in r}, reference=r['reference'], ours=r['ours']) for r in rows]


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
        from models.kernels import backend_status
        env['optional_attention'] = {b: backend_status(b)[0] or backend_status(b)[1] for b in ('flash', 'xformers')}
    except Exception as e:
        env['optional_attention'] = repr(e)
    return env


def fmt_measurement(name: str, m: Dict) -> str:
    mem = m.get('peak_memory_gb')
    return f"{name} {m['images_per_sec']:.3g} img/s" + (f" {mem:.3g} GB" if mem is not None else '')


def write_json_atomic(obj, path: str) -> None:
    from utils.ckpt import write_bytes_atomic   # the repository is on sys.path (main puts it there)
    write_bytes_atomic(json.dumps(obj, indent=1).encode(), path)


def summarise(work: str, out: str, device: str, seconds: int) -> int:
    summary: Dict = {'device': device, 'dry_run': device != 'cuda', 'seconds': seconds, 'errors': []}
    summary.update(environment())
    try:
        with open(os.path.join(work, 'missing.txt')) as f:
            summary['missing_packages'] = f.read().split()
    except OSError as e:
        summary['errors'].append(f'missing.txt: {e}')
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
    summary['measurements'] = {}
    for s in summary['steps']:
        path = os.path.join(work, f"{s['name']}.json")
        if s['name'] == REFERENCE_STEP and s['status'] == 'passed':
            try:
                summary['reference_compare'] = read_reference_compare(os.path.join(out, 'compare_reference.json'))
            except (OSError, ValueError, KeyError, TypeError) as e:
                s['status'] = f'failed (unreadable output: {e!r})'
        elif s['name'] not in ('cuda_tests', REFERENCE_STEP) and s['status'] == 'passed':
            try:
                summary['measurements'][s['name']] = read_measurement(path)
            except (OSError, ValueError, KeyError, IndexError) as e:
                s['status'] = f'failed (unreadable output: {e!r})'

    ok = (bool(summary['steps']) and all(s['status'] == 'passed' for s in summary['steps']) and not summary['errors']
          and summary['tests'] is not None and summary['tests']['failed'] + summary['tests']['errors'] == 0)
    summary['status'] = 'pass' if ok else 'fail'
    write_json_atomic(summary, os.path.join(out, 'summary.json'))

    t = summary['tests']
    tests = 'tests: unreadable' if t is None else f"tests {t['passed']} passed, {t['failed'] + t['errors']} failed, {t['skipped']} skipped"
    bad = [f"{s['name']} {s['status']}" for s in summary['steps'] if s['status'] != 'passed']
    meas = [fmt_measurement(n, m) for n, m in summary['measurements'].items()]
    if 'reference_compare' in summary:
        meas.append('vs the reference (best round): ' + ', '.join(f"{r['row']} {r['ratio_best']:.2f}x" for r in summary['reference_compare']
                                                              if r['what'] == 'seconds'))
    where = summary.get('card', 'no GPU') + f", torch {summary.get('torch', '?')}, CUDA {summary.get('cuda', '-')}"
    kind = 'GPU CHECK' if device == 'cuda' else 'GPU CHECK DRY RUN (cpu)'
    print(f"{kind}: {summary['status'].upper()} in {seconds}s | {where} | {tests} | " + ' | '.join(meas + bad)
          + f" | {os.path.join(out, 'summary.json')}")
    return 0 if ok else 1


@dataclass
class SummaryArgs:
    """Flags of tools/gpu_check_summary.py (all given by tools/gpu_check.sh)."""
    work: str = flag(help="gpu_check.sh's scratch folder: steps.tsv, one NAME.json per bench step, missing.txt", metavar='DIR',
                     group='data')
    out: str = flag(help="gpu_check.sh's OUT_DIR: holds junit.xml of the tests; summary.json is written there", metavar='DIR',
                    group='output')
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
