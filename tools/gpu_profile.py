"""Where the GPU time of a step goes: torch.profiler over a live bf16 training step, a bf16 step from pre-extracted tokens
and an fp16 sampling call, eager ("before") and with this code's speed features ("after": utils.compile.compile_blocks
for training, utils.sampling_graphs.use_cuda_graphs for sampling).

    python tools/gpu_profile.py --out=DIR                                # on a GPU: d16, batch 32 (sampling 64), 256 px
    python tools/gpu_profile.py --out=DIR --device=cpu --quick           # dry run: CPU activities, tiny sizes

Random weights (models.build_vae_var's initialisation), bench.py's training step (train_step: the reference trainer's,
fused AdamW, TF32 on) and sampling call (sample_batch: cfg 1.5, top-k 900, top-p 0.96). Each case runs its warm-up
(two steps with a speed feature: compilation or capture happen there), one timed step without the profiler, then one
profiled step. Per case: the 15 kernels with the most GPU time, and the shares of the GPU time (the kernels' summed
durations) by category: the tokenizer (the VQVAE: the live step's encoding, sampling's decoding; marked with
torch.profiler.record_function('tokenizer') and a synchronisation on each side, so exactly its kernels run inside
that range), then by kernel name: attention (flash, memory-efficient, cuDNN, FlexAttention: 'triton_tem' kernels,
inductor's templates, which without max-autotune are FlexAttention's), convolution, GEMM (cuBLAS/cuBLASLt incl. nvjet,
CUTLASS, sm90 xmma), norm/elementwise (layer norm, PyTorch's elementwise and reduction kernels, inductor's fused Triton
kernels), other. Launch gaps: the step's wall time without the profiler minus the union of the kernels' busy intervals
(the profiled step's own gaps too, which the profiler's bookkeeping inflates). On the CPU the 'kernels' are the
outermost aten operators: the dry run checks the script, its shares mean little.

Writes DIR/profile.json after every case (a run stopped from outside keeps the cases done) and prints a compact table.
"""
import gc
import json
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == '__main__':   # run as tools/gpu_profile.py: the project's modules are one folder up
    sys.path.insert(0, REPO)
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import bench  # noqa: E402  (its `if __name__ == '__main__'` parts do not run on import)
from models import PATCH_NUMS_256, build_vae_var  # noqa: E402
from utils.ckpt import write_bytes_atomic  # noqa: E402
from utils.cli import UserError, run_main  # noqa: E402
from utils.flags import flag, parse_dataclass  # noqa: E402

# case → (what, live tokenisation, dtype, the speed features of "after")
CASES = {
    'train_live_bf16': ('train', True, 'bf16', ('compile_blocks',)),
    'train_tokens_bf16': ('train', False, 'bf16', ('compile_blocks',)),
    'sample_fp16': ('sample', None, 'fp16', ('use_cuda_graphs',)),
}
# category → kernel-name pattern, tried in this order (the first match wins; the tokenizer's range comes before all)
CATEGORIES = (
    ('attention', re.compile(r'flash|fmha|attention|attn|sdpa|flex|triton_tem', re.I)),
    ('convolution', re.compile(r'conv|fprop|dgrad|wgrad|winograd|implicit_gemm|cudnn', re.I)),
    ('GEMM', re.compile(r'gemm|gemv|cutlass|cublas|nvjet|xmma|matmul|splitk|sm90_|sm80_|'
                        r'aten::((add|b|baddb)?mm|linear|matmul)$', re.I)),
    ('norm/elementwise', re.compile(r'norm|elementwise|vectorized|unrolled|triton_(poi|red|per)|reduce|softmax|catarray|'
                                    r'aten::(add|mul|sub|div|silu|gelu|copy_|fill_|cat|clone|where|exp|pow|sum|mean)_?$', re.I)),
)
MARKS = ('tokenizer', 'step')   # this script's record_function ranges (never counted as kernels)
TOP = 15


@contextmanager
def _marked(device: torch.device, name: str):
    """A profiler range that holds exactly the kernels launched inside it: the GPU is idle at its start and done at its end."""
    bench._sync(device)
    with record_function(name):
        yield
        bench._sync(device)


def _kernels(events, device: torch.device) -> List:
    """The events that are GPU work (kernels, copies, sets) on CUDA; on the CPU the outermost aten operators (inside no
    other: their intervals do not overlap, as kernels on one stream)."""
    if device.type == 'cuda':
        return [e for e in events if e.device_type == DeviceType.CUDA and e.name not in MARKS
                and not getattr(e, 'is_user_annotation', False) and getattr(e, 'activity_type', 'kernel') != 'gpu_user_annotation']
    return [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith('aten::') and not _inside_aten(e)]


def _inside_aten(e) -> bool:
    parent = e.cpu_parent
    while parent is not None:
        if parent.name.startswith('aten::'):
            return True
        parent = parent.cpu_parent
    return False


def _union_us(intervals: List[Tuple[float, float]]) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    return total


def _category(name: str) -> str:
    return next((c for c, pattern in CATEGORIES if pattern.search(name)), 'other')


def analyse(events, device: torch.device, wall_unprofiled_s: float) -> Dict:
    """The profiled step's kernels: the top ones, the shares by category, and the launch gaps."""
    ranges = {}
    for e in events:
        if e.name in MARKS and e.device_type == DeviceType.CPU:
            ranges.setdefault(e.name, []).append((e.time_range.start, e.time_range.end))
    step_start, step_end = ranges['step'][0]
    kernels = [k for k in _kernels(events, device) if step_start <= k.time_range.start <= step_end]
    spans = [(k.time_range.start, k.time_range.end) for k in kernels]
    total_us = sum(b - a for a, b in spans) or 1e-9
    busy_us = _union_us(spans)
    by_name: Dict[str, List[float]] = {}
    by_category: Dict[str, float] = {c: 0.0 for c in ['tokenizer'] + [c for c, _ in CATEGORIES] + ['other']}
    for k, (a, b) in zip(kernels, spans):
        mid = (a + b) / 2
        in_tokenizer = any(s <= mid <= e for s, e in ranges.get('tokenizer', []))
        by_category['tokenizer' if in_tokenizer else _category(k.name)] += b - a
        by_name.setdefault(k.name, []).append(b - a)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:TOP]
    wall_us = (step_end - step_start)
    return {
        'wall_ms_unprofiled': wall_unprofiled_s * 1e3, 'wall_ms_profiled': wall_us / 1e3, 'kernels': len(kernels),
        'kernel_ms': total_us / 1e3, 'busy_ms': busy_us / 1e3,
        'launch_gaps_ms': max(0.0, wall_unprofiled_s * 1e6 - busy_us) / 1e3,
        'launch_gaps_share': max(0.0, wall_unprofiled_s * 1e6 - busy_us) / max(wall_unprofiled_s * 1e6, 1e-9),
        'launch_gaps_ms_profiled': max(0.0, wall_us - busy_us) / 1e3,
        'categories': {c: {'ms': us / 1e3, 'share': us / total_us} for c, us in by_category.items()},
        'top': [{'name': n[:160], 'ms': sum(d) / 1e3, 'calls': len(d), 'share': sum(d) / total_us, 'category': _category(n)}
                for n, d in top],
    }


@dataclass
class ProfileArgs:
    """Flags of tools/gpu_profile.py."""
    out: str = flag('', 'the folder profile.json is written to (created)', metavar='DIR', group='output')
    device: str = flag('cuda', 'cuda: CUDA kernels; cpu: the dry run (CPU activities)', choices=('cuda', 'cpu'), group='environment')
    depth: int = flag(16, 'VAR depth', group='model')
    bs: int = flag(32, 'images per training step', group='model')
    sample_bs: int = flag(64, 'images per sampling call', group='model')
    quick: bool = flag(False, "bench.py compare --quick's tiny model (depth 2, 64 px, a narrow tokenizer) and batch 2, to "
                              'check the script', group='model')
    cases: str = flag(','.join(CASES), f"the cases, comma-separated ({', '.join(CASES)})", group='benchmark')
    budget_s: float = flag(0.0, 'no case is started once this many seconds have passed (the JSON says which were left); '
                                '0: no limit', group='benchmark')


def _build(sizes: Dict, device: torch.device):
    """The tokenizer and a VAR on it, random weights: the same for every call (seeded)."""
    torch.manual_seed(0)
    return build_vae_var(device=device, **bench.build_kwargs(sizes, device.type))


def _case_runner(case: str, vae, var, sizes: Dict, sample_bs: int, device: torch.device):
    """A function that runs one step of the case (sync at its end), with the tokenizer marked when `marked`."""
    what, live, dtype, _ = CASES[case]
    if what == 'sample':
        label_B = (torch.arange(sample_bs, device=device) * 7) % 1000
        decode = vae.fhat_to_img

        def step(marked: bool):
            if marked:   # sampling's tokenizer part: decoding the last scale's f_hat
                def marked_decode(f_hat):
                    with _marked(device, 'tokenizer'):
                        return decode(f_hat)
                vae.fhat_to_img = marked_decode
            try:
                bench.sample_batch(var, label_B, dtype)
            finally:
                vae.__dict__.pop('fhat_to_img', None)
            bench._sync(device)
        var.eval()
        return step
    img_B3HW, label_B = bench.make_inputs(sizes, device)
    var.train()
    opt = bench.reference_optimizer(var)
    tokens = None if live else bench.tokenise(vae, img_B3HW)

    def step(marked: bool):
        bench.train_step(vae, var, opt, None, img_B3HW, label_B, tokens, dtype,
                         mark=lambda name: _marked(device, name) if marked else nullcontext())
        bench._sync(device)
    return step


def profile_case(step, device: torch.device, warmup: int) -> Dict:
    warm = []
    for _ in range(warmup):
        t = time.perf_counter()
        step(False)
        warm.append(time.perf_counter() - t)
    t = time.perf_counter()
    step(False)
    wall = time.perf_counter() - t
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        with record_function('step'):
            step(True)
    return dict(analyse(prof.events(), device, wall), warmup_s=warm)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def run(args: ProfileArgs) -> Dict:
    device = torch.device(args.device)
    if device.type == 'cuda':   # TF32, as train.py and both sides of bench.py compare run
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sizes = dict(bench.QUICK_SIZES) if args.quick else dict(depth=args.depth, bs=args.bs, patch_nums=tuple(PATCH_NUMS_256))
    sample_bs = 2 if args.quick else args.sample_bs
    cases = [c.strip() for c in args.cases.split(',') if c.strip()]
    result = {'device': str(device), 'gpu': torch.cuda.get_device_name() if device.type == 'cuda' else None, 'torch': torch.__version__,
              'sizes': dict(sizes, sample_bs=sample_bs), 'cases': {c: {} for c in cases}}
    t0 = time.monotonic()
    path = os.path.join(args.out, 'profile.json')
    os.makedirs(args.out, exist_ok=True)

    def record(case: str, mode: str, r: Dict) -> None:
        result['cases'][case][mode] = r
        result['seconds'] = time.monotonic() - t0
        write_bytes_atomic(json.dumps(result, indent=1).encode(), path)
        print(f'{case} {mode}: ' + (f"{r['wall_ms_unprofiled']:.1f} ms, gaps {100 * r['launch_gaps_share']:.0f} %" if 'top' in r
                                    else r['status']), flush=True)

    def attempt(case: str, mode: str, vae, var, features: Sequence[str] = (), apply: bool = True):
        """Profile one case and mode; the model it ran with (`features` applied first when `apply`), or None where it could
        not run. Recorded either way."""
        if args.budget_s and time.monotonic() - t0 > args.budget_s:
            record(case, mode, {'status': f'not run: --budget_s={args.budget_s:g} spent'})
            return None
        try:
            status, call_s = 'measured', 0.0
            if features and apply:
                var, status, call_s = bench.apply_features(var, tuple(features))
            if status != 'measured':
                record(case, mode, {'status': status, 'features': list(features)})
                return None
            step = _case_runner(case, vae, var, sizes, sample_bs, device)
            r = profile_case(step, device, bench.FEATURE_WARMUP_STEPS if features else 1)
            record(case, mode, dict(r, status='measured', features=list(features), feature_call_s=call_s))
            return var
        except Exception as e:   # a failing case is recorded; the others still run
            traceback.print_exc()
            record(case, mode, {'status': f'failed: {_first_line(e)}', 'features': list(features)})
            return None

    vae, var = _build(sizes, device)
    for case in cases:   # before: eager
        attempt(case, 'before', vae, var)
    del vae, var
    gc.collect()
    if 'sample_fp16' in cases:   # after: sampling with graphs first (nothing to compile), on a fresh model
        vae, var = _build(sizes, device)
        attempt('sample_fp16', 'after', vae, var, CASES['sample_fp16'][3])
        del vae, var
        gc.collect()
    train_cases = sorted((c for c in cases if CASES[c][0] == 'train'), key=lambda c: CASES[c][1])   # from tokens first
    if train_cases:   # after: one compiled model for both training cases (the same shapes: compiled once)
        vae, var = _build(sizes, device)
        compiled = None
        for case in train_cases:
            ran = attempt(case, 'after', vae, var if compiled is None else compiled, CASES[case][3], apply=compiled is None)
            compiled = ran if compiled is None else compiled
    result['seconds'] = time.monotonic() - t0
    write_bytes_atomic(json.dumps(result, indent=1).encode(), path)
    return result


def print_table(result: Dict) -> None:
    cats = ['tokenizer'] + [c for c, _ in CATEGORIES] + ['other']
    print(f"\n| case | mode | step ms (no profiler) | kernel busy ms | launch gaps | {' | '.join(cats)} |\n"
          + '| --- ' * (5 + len(cats)) + '|')
    for case, modes in result['cases'].items():
        for mode, r in modes.items():
            if 'top' not in r:
                print(f"| {case} | {mode} | {r['status']} |")
                continue
            shares = ' | '.join(f"{100 * r['categories'][c]['share']:.0f} %" for c in cats)
            print(f"| {case} | {mode} | {r['wall_ms_unprofiled']:.1f} | {r['busy_ms']:.1f} | {r['launch_gaps_ms']:.1f} ms "
                  f"({100 * r['launch_gaps_share']:.0f} %) | {shares} |")
    for case, modes in result['cases'].items():
        for mode, r in modes.items():
            if 'top' in r:
                print(f"\n{case}, {mode}: top {len(r['top'])} of {r['kernels']} kernels by GPU time")
                for k in r['top']:
                    print(f"  {k['ms']:8.2f} ms {100 * k['share']:5.1f} % x{k['calls']:<5d} {k['category']:<16s} {k['name'][:110]}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_dataclass(ProfileArgs, argv, description=__doc__.splitlines()[0])
    if not args.out:
        raise UserError('--out is required: the folder profile.json goes to (e.g. --out=local_output/profile)')
    unknown = [c for c in args.cases.split(',') if c.strip() and c.strip() not in CASES]
    if unknown:
        raise UserError(f'--cases={args.cases}: {", ".join(unknown)} is not a case; give some of {", ".join(CASES)}, comma-separated')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device=cuda: no CUDA device is visible here (torch.cuda.is_available() is False); use --device=cpu')
    print_table(run(args))


if __name__ == '__main__':
    run_main(main)
