"""Speed and memory benchmarks (not tests): training step and sampling, split by stage, on the CPU or CUDA.

    python bench.py train  --depth=8 --bs=4 --reso=256 --dtype=fp32 [--tf32] [--tokens] [--grad_ckpt] [--mode=baseline]
    python bench.py sample --depth=8 --bs=4 --dtype=fp32 [--tf32] [--mode=baseline]
    python bench.py compare --reference=DIR [--depth=8] [--bs=4] [--repeat=3] [--threads=N] [--steps=1] [--quick] [--out_dir=DIR]
    python bench.py compare --reference=DIR --device=cuda --depth=16 --bs=32 --steps=5   # on a GPU
    python bench.py compare [--repeat=3] [--quick] [--out_dir=DIR]   # ablation: this code against its own --mode=baseline
    python bench.py cpu        # the CPU, its ISA features, and which fast paths this code takes on it and why

`compare --reference=DIR` times the reference implementation itself (DIR: a work tree of FoundationVision/VAR kept
outside this project; nothing of it is copied here) against this code on the CPU in float32, through the public API
both share: `build_vae_var`, `vae.img_to_idxBl`, `vae.quantize.idxBl_to_var_input`, `var(label_B, x_BLCv_wo_first_l)`
with the reference trainer's loss (cross entropy, label smoothing 0.1), backward, gradient clipping at 2 and an AdamW
step (the same plain torch.optim.AdamW on both sides), and `var.autoregressive_infer_cfg(B, label_B, g_seed=0,
cfg=1.5, top_k=900, top_p=0.96, more_smooth=False)` with its images. Rows: a training step with live tokenisation,
a training step from pre-extracted tokens (computed before the timed steps), sampling a batch, and the peak resident
memory (ru_maxrss) of each measuring process, from the moment its models hold the shared weights (Linux: the peak
is reset then through /proc/self/clear_refs, so reading the weights file does not count). Every measurement is a
fresh process (`bench.py side`) whose sys.path puts DIR (or this repo) first, so `import models` is that
implementation (its file is printed and kept in the JSON);
rounds are interleaved (reference, this code, reference, ...), every process uses --threads threads, one warm-up step
then --steps timed ones (their median is the round's figure). Both sides load the same random-but-sane weights (this
code's initialisation, saved once and loaded strictly: the reference's builder leaves the tokenizer uninitialised)
and the same seeded images and labels; the token maps of the images and the sampled images of both are compared.
Both sides tokenise under torch.no_grad() (their tokenizers are frozen: no graph either way) and sample under
torch.inference_mode().
Runtime shims for the reference, applied from here and never by editing DIR: both sides are built with
flash_if_available=False and fused_if_available=False (flash-attn, xformers and the fused MLP are CUDA kernels), and
the measuring processes see no GPU (CUDA_VISIBLE_DEVICES empty: the reference picks its sampling generator's device
from torch.cuda.is_available()). Its `torch.cuda.amp.autocast(enabled=False)` blocks run as they are on the CPU.
The training step's optimiser is fused AdamW on the CPU and CUDA alike, as both trainers build it by default (--afuse).
`compare --reference=DIR --device=cuda` runs the same harness on the GPU the way both codebases are used there (d16 and
batch 32 are good sizes): TF32 allowed (the reference's --tf32 default), each side's default attention and MLP kernels,
fused AdamW, and the rows: a training step with live tokenisation under bfloat16 autocast, the same under float16
autocast with a loss scaler, and sampling under float16 autocast (the reference notebook's); peak memory is CUDA's
peak allocation after the weights are loaded; each row also gives images/s.

`--mode=baseline` switches every optimisation of this codebase off (dense masked attention, F.linear,
whole-batch NCHW direct convs, nearest-upsample-then-conv): what the reference computes, op for op. Each measurement of
`compare` runs in a fresh process, so its peak resident memory is its own. Times are medians of the
timed steps after one warm-up step. The tokenizer weights are random but sane (default init).
Training steps run as train.py's do: the trainer's AmpOptimizer set-up (--dtype=fp16 with its loss scaler),
fused AdamW where available, gradient clipping at 2. On CUDA, peak memory is torch's peak allocation, and
float32 is IEEE float32 unless --tf32 (TensorFloat32 matmuls and convolutions, train.py's default there).
"""
if __name__ == '__main__':   # before PyTorch loads: libgomp reads its idle spin once (utils/threads.py)
    from utils.threads import shorten_openmp_spin_for_nnpack
    shorten_openmp_spin_for_nnpack()

import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from utils.flags import flag, parse_dataclass   # the standard library only: `bench.py side` imports `models` from --impl after it

REPO = os.path.dirname(os.path.abspath(__file__))


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


MIXED_PRECISION = {'fp32': 0, 'fp16': 1, 'bf16': 2}   # train.py's --fp16 for each --dtype


def _set_tf32(device: torch.device, enabled: bool) -> None:
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def _amp(device: torch.device, dtype: str):
    if dtype == 'fp32':
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == 'bf16' else torch.float16)


def build(args, device):
    from models import PATCH_NUMS_256, PATCH_NUMS_512, build_vae_var
    torch.manual_seed(0)
    patch_nums = {256: PATCH_NUMS_256, 512: PATCH_NUMS_512}[args.reso]
    vae, var = build_vae_var(device=device, patch_nums=patch_nums, depth=args.depth, shared_aln=args.depth >= 36)
    fast = args.mode == 'fast'
    vae.set_fast_paths(fast)
    var.set_fast_paths(fast)
    return vae, var


def bench_train(args) -> Dict:
    device = torch.device(args.device)
    vae, var = build(args, device)
    var.train()
    var.grad_ckpt = args.grad_ckpt
    from utils.amp_opt import AmpOptimizer, build_adamw
    from utils.lr_control import filter_params
    names, paras, groups = filter_params(var)
    opt = build_adamw(groups, lr=1e-4, fused=True)
    amp_opt = AmpOptimizer(device.type, MIXED_PRECISION[args.dtype], opt, names, paras, grad_clip=2.0)
    scaler = amp_opt.scaler   # float16 only
    B, V = args.bs, var.V
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(B, 3, args.reso, args.reso, generator=g) * 2 - 1).to(device)
    labels = torch.randint(0, 1000, (B,), generator=g).to(device)
    with torch.no_grad():
        tokens = vae.img_to_idxBl(img)   # for --tokens: as extract_tokens.py would have written them
    stages: Dict[str, List[float]] = {k: [] for k in ('tokenise', 'forward', 'backward', 'optimiser', 'total')}
    for step in range(args.steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            idx_Bl = tokens if args.tokens else vae.img_to_idxBl(img)
            gt_BL = torch.cat(idx_Bl, 1)
            x_BLCv = vae.quantize.idxBl_to_var_input(idx_Bl)
        _sync(device)
        t1 = time.perf_counter()
        with amp_opt.amp_ctx:
            logits = var(labels, x_BLCv)
            loss = F.cross_entropy(logits.view(-1, V), gt_BL.view(-1))
        _sync(device)
        t2 = time.perf_counter()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        _sync(device)
        t3 = time.perf_counter()
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t4 = time.perf_counter()
        if step > 0:   # step 0 warms up
            for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                stages[k].append(v)
    med = {k: statistics.median(v) for k, v in stages.items()}
    return {'what': 'train', **vars(args), 'seconds': med, 'images_per_sec': B / med['total'], 'peak_memory_gb': _peak_memory_gb(device),
            'final_loss': loss.item()}


def bench_sample(args) -> Dict:
    device = torch.device(args.device)
    vae, var = build(args, device)
    var.eval()
    decode_times: List[float] = []
    plain_decode = vae.fhat_to_img

    def timed_decode(f_hat):
        _sync(device)
        t = time.perf_counter()
        out = plain_decode(f_hat)
        _sync(device)
        decode_times.append(time.perf_counter() - t)
        return out
    vae.fhat_to_img = timed_decode
    labels = torch.arange(args.bs, device=device) * 7
    totals, images = [], []
    for step in range(args.steps + 1):
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode(), _amp(device, args.dtype):
            out = var.autoregressive_infer_cfg(B=args.bs, label_B=labels, g_seed=0, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False)
        _sync(device)
        if step > 0:
            totals.append(time.perf_counter() - t)
        images.append(out.float().cpu())
    total, decode = statistics.median(totals), statistics.median(decode_times[1:])
    if args.save_images:
        torch.save(images[-1], args.save_images)
    return {'what': 'sample', **vars(args), 'seconds': {'transformer': total - decode, 'decode': decode, 'total': total},
            'images_per_sec': args.bs / total, 'peak_memory_gb': _peak_memory_gb(device)}


def run_one(argv: List[str]) -> Dict:
    """One measurement in a fresh process (so peak memory is its own)."""
    res = subprocess.run([sys.executable, os.path.join(REPO, 'bench.py'), *argv, '--json'], capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f'bench.py {" ".join(argv)} failed:\n{res.stderr[-3000:]}')
    return json.loads(res.stdout.strip().splitlines()[-1])


def median_of(runs: List[Dict]) -> Dict:
    """Stage-wise medians of repeated measurements (the spread of the totals is kept)."""
    r = dict(runs[-1])
    r['seconds'] = {k: statistics.median(x['seconds'][k] for x in runs) for k in runs[0]['seconds']}
    r['images_per_sec'] = r['bs'] / r['seconds']['total']
    r['peak_memory_gb'] = statistics.median(x['peak_memory_gb'] for x in runs)
    r['totals'] = [x['seconds']['total'] for x in runs]
    r['peaks'] = [x['peak_memory_gb'] for x in runs]
    return r


def fmt_row(r: Dict, base: Dict) -> str:
    s = r['seconds']
    stages = ', '.join(f'{k} {v:.2f}' for k, v in s.items() if k != 'total')
    ratio = base['seconds']['total'] / s['total']
    spread = f" ({min(r['totals']):.2f}–{max(r['totals']):.2f})" if len(r['totals']) > 1 else ''
    mem = f" ({min(r['peaks']):.2f}–{max(r['peaks']):.2f})" if len(r['peaks']) > 1 else ''
    return f"| {r['label']} | {s['total']:.2f}{spread} | {r['images_per_sec']:.2f} | {ratio:.2f}x | {stages} | {r['peak_memory_gb']:.2f}{mem} |"


def measure(runs: List, common: List[str], repeat: int) -> List[Dict]:
    """Every run `repeat` times, interleaved (baseline, fast, ..., baseline, fast, ...), so drift hits all alike."""
    samples: Dict[str, List[Dict]] = {label: [] for label, _ in runs}
    for _ in range(repeat):
        for label, argv in runs:
            samples[label].append(run_one(argv + common))
    out = []
    for label, _ in runs:
        r = median_of(samples[label])
        r['label'] = label
        out.append(r)
    return out


def compare(args) -> None:
    """Baseline and this code side by side: the README's table."""
    d, bs, steps = (2, 2, 1) if args.quick else (args.depth, args.bs, args.steps)
    common = [f'--depth={d}', f'--bs={bs}', f'--steps={steps}', f'--device={args.device}']
    tmp = args.out_dir
    os.makedirs(tmp, exist_ok=True)
    train_runs = [
        ('reference ops, fp32 (baseline)', ['train', '--mode=baseline', '--dtype=fp32']),
        ('this code, fp32', ['train', '--dtype=fp32']),
        ('this code, fp32, pre-extracted tokens', ['train', '--dtype=fp32', '--tokens']),
        ('this code, bf16 autocast', ['train', '--dtype=bf16']),
        ('this code, bf16 autocast, pre-extracted tokens', ['train', '--dtype=bf16', '--tokens']),
    ]
    sample_runs = [
        ('reference ops, fp32 (baseline)', ['sample', '--mode=baseline', '--dtype=fp32', f'--save_images={tmp}/base.pt']),
        ('this code, fp32', ['sample', '--dtype=fp32', f'--save_images={tmp}/fast.pt']),
        ('this code, bf16 autocast', ['sample', '--dtype=bf16', f'--save_images={tmp}/bf16.pt']),
    ]
    results = []
    header = '| run | seconds | images/s | speed-up | stages (s) | peak memory (GB) |\n| --- | --- | --- | --- | --- | --- |'
    print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}, '
          f'{torch.get_num_threads()} threads; medians of {args.repeat} interleaved runs (min–max in brackets)\n')
    for title, runs in (('training step', train_runs), ('sampling', sample_runs)):
        rows = measure(runs, common, args.repeat)
        print(f'### {title}: depth {d}, batch {bs}, {args.reso} px\n\n{header}')
        for r in rows:
            print(fmt_row(r, rows[0]))
        print(flush=True)
        results += rows
    base_img, fast_img, bf16_img = (torch.load(f'{tmp}/{n}.pt') for n in ('base', 'fast', 'bf16'))
    print(f'sampled images vs the baseline (max |diff| in [0, 1]): this code fp32 {(fast_img - base_img).abs().max():.2e}, '
          f'bf16 {(bf16_img - base_img).abs().max():.2e}\n')
    if not args.quick:
        print(f'### activation checkpointing: depth 16, batch {bs}, fp32, from tokens\n\n{header}')
        rows = measure([('--grad_ckpt off', ['train', '--tokens']), ('--grad_ckpt on', ['train', '--tokens', '--grad_ckpt'])],
                       ['--depth=16', f'--bs={bs}', '--steps=1', f'--device={args.device}'], 1)
        for r in rows:
            print(fmt_row(r, rows[0]), flush=True)
        results += rows
    with open(os.path.join(tmp, 'compare.json'), 'w') as f:
        json.dump(results, f, indent=1)


# ---------------------------------------------------------------- the machine and this code's choices on it
ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')


def cpu_info(threads: int) -> Dict:
    """CPU model, the ISA features the kernels care about, cores, threads and the torch build."""
    fields: Dict[str, str] = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:   # the first processor's fields are enough
                key, _, value = line.partition(':')
                fields.setdefault(key.strip(), value.strip())
    except OSError:   # not Linux: the model from platform, no flags
        pass
    model, flags = fields.get('model name') or platform.processor() or platform.machine(), set(fields.get('flags', '').split())
    return {'cpu': model, 'isa': {f: f in flags for f in ISA_FLAGS}, 'cores': len(os.sched_getaffinity(0)),
            'threads': threads, 'torch': torch.__version__, 'torch_cpu_capability': torch.backends.cpu.get_cpu_capability()}


def describe_machine(info: Dict) -> str:
    isa = ', '.join(f"{f} {'yes' if v else 'no'}" for f, v in info['isa'].items())
    return (f"CPU: {info['cpu']}; ISA: {isa} (torch dispatches {info['torch_cpu_capability']}); {info['cores']} cores, "
            f"{info['threads']} threads; torch {info['torch']}")


def fast_path_lines() -> List[str]:
    """Which fast path this code takes on this machine, and why (models/kernels decides; see describe_choices)."""
    from models.kernels import describe_choices
    from models.kernels.choices import describe_attention
    return describe_choices() + [
        describe_attention(),
        'oneDNN linear, Winograd and the C attention kernel are chosen by the CPU rule table of utils/cpu_rules.py (vendor, ISA flags, cores; '
        'never by timing); the size thresholds were measured on a 2-core AMD EPYC with AVX-512',
        'OpenMP\'s idle spin: every measuring process of `compare`, the reference\'s as well as this code\'s, starts with the '
        'environment above (bench.py sets it before PyTorch loads, as this project\'s scripts do)',
    ]


def cpu(args) -> None:
    """`bench.py cpu`: the machine and the fast paths this code chooses on it."""
    print(describe_machine(cpu_info(torch.get_num_threads())))
    for line in fast_path_lines():
        print(f'- {line}')


# ---------------------------------------------------------------- side by side with the reference implementation
# row → (title, what, live tokenisation, dtype). The CPU rows are exact float32; the CUDA rows are how both codebases are
# run on a GPU: train.py's --fp16=2 / --fp16=1 (autocast; fp16 with a loss scaler) and the reference notebook's float16
# autocast for sampling, TF32 allowed on both sides (the reference's --tf32 default).
ROW_SPECS = {
    'train_live': ('training step, live tokenisation', 'train', True, 'fp32'),
    'train_tokens': ('training step, pre-extracted tokens', 'train', False, 'fp32'),
    'sample': ('sampling a batch', 'sample', None, 'fp32'),
    'train_live_bf16': ('training step, live tokenisation, bf16 autocast', 'train', True, 'bf16'),
    'train_live_fp16': ('training step, live tokenisation, fp16 autocast + loss scaler', 'train', True, 'fp16'),
    'sample_fp16': ('sampling a batch, fp16 autocast', 'sample', None, 'fp16'),
}
DEVICE_ROWS = {'cpu': ('train_live', 'train_tokens', 'sample'), 'cuda': ('train_live_bf16', 'train_live_fp16', 'sample_fp16')}
QUICK_SIZES = dict(depth=2, bs=2, patch_nums=(1, 2, 3, 4), ch=32, Cvae=8)   # 64 px, a tokenizer 5x narrower: to check the harness


def side_sizes(args) -> Dict:
    if args.quick:
        return dict(QUICK_SIZES)
    from models import PATCH_NUMS_256, PATCH_NUMS_512
    return dict(depth=args.depth, bs=args.bs, patch_nums={256: PATCH_NUMS_256, 512: PATCH_NUMS_512}[args.reso])


def _build_kwargs(sizes: Dict, device: str = 'cpu') -> Dict:
    kw = {k: v for k, v in sizes.items() if k != 'bs'}
    # flash-attn / xformers / the fused MLP are CUDA kernels: off on the CPU so neither side reaches for them; on CUDA each
    # side's default (both fall back to PyTorch's SDPA and MLP where the packages are not installed)
    cuda = device.startswith('cuda')
    return dict(kw, patch_nums=tuple(kw['patch_nums']), shared_aln=kw['depth'] >= 36, flash_if_available=cuda, fused_if_available=cuda)


def _inputs(sizes: Dict, device: str = 'cpu'):
    g = torch.Generator().manual_seed(0)
    reso = sizes['patch_nums'][-1] * 16
    img_B3HW = torch.rand(sizes['bs'], 3, reso, reso, generator=g) * 2 - 1
    label_B = torch.randint(0, 1000, (sizes['bs'],), generator=g)
    return img_B3HW.to(device), label_B.to(device)


def _tokenise(vae, img_B3HW):
    with torch.no_grad():   # the VAE's parameters are frozen on both sides: no graph either way
        idx_Bl = vae.img_to_idxBl(img_B3HW)
        return idx_Bl, torch.cat(idx_Bl, 1), vae.quantize.idxBl_to_var_input(idx_Bl)


def _train_steps(vae, var, img_B3HW, label_B, steps: int, live: bool, dtype: str = 'fp32'):
    """The reference trainer's step: logits under its autocast (tokenisation outside it), label-smoothed cross entropy,
    backward (float16: through a loss scaler, unscaled before clipping), clip at 2, AdamW step (fused, as both trainers
    build it by default: the reference's and this project's --afuse=True; PyTorch has a fused AdamW on the CPU too)."""
    var.train()
    device = img_B3HW.device
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    scaler = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None
    tokens = None if live else _tokenise(vae, img_B3HW)   # pre-extracted: outside the timed region
    times, loss = [], None
    for _ in range(steps + 1):   # the first one warms up
        _sync(device)
        t = time.perf_counter()
        idx_Bl, gt_BL, x_BLCv = _tokenise(vae, img_B3HW) if live else tokens
        with _amp(device, dtype):
            logits_BLV = var(label_B, x_BLCv)
            loss = F.cross_entropy(logits_BLV.view(-1, logits_BLV.shape[-1]), gt_BL.view(-1), label_smoothing=0.1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t)
    return times[1:], {'loss': loss.item(), 'tokens': [t.cpu() for t in idx_Bl]}


def _sample_steps(var, label_B, steps: int, dtype: str = 'fp32'):
    var.eval()
    device = label_B.device
    times, img = [], None
    for _ in range(steps + 1):
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode(), _amp(device, dtype):
            img = var.autoregressive_infer_cfg(len(label_B), label_B, g_seed=0, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False)
        _sync(device)
        times.append(time.perf_counter() - t)
    return times[1:], {'images': img.float().cpu().clone()}


def _reset_peak_rss() -> bool:
    """Start ru_maxrss afresh from the current resident set (Linux: /proc/self/clear_refs); False where refused."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def side(args) -> None:
    """One measurement in this fresh process, by the implementation in --impl (its `models` first on sys.path)."""
    torch.set_num_threads(args.threads)
    impl = os.path.abspath(args.impl)
    sys.path.insert(0, impl)
    import models
    if os.path.dirname(os.path.dirname(os.path.abspath(models.__file__))) != impl:
        raise RuntimeError(f'`import models` resolved to {models.__file__}, not to {impl}')
    sizes = json.loads(args.sizes)
    device = torch.device(args.device or 'cpu')
    _set_tf32(device, device.type == 'cuda')   # the reference's --tf32 default, and train.py's
    _, what, live, dtype = ROW_SPECS[args.row]
    torch.manual_seed(0)
    vae, var = models.build_vae_var(device=device, **_build_kwargs(sizes, device.type))
    weights = torch.load(args.weights, map_location='cpu', mmap=True)
    vae.load_state_dict(weights['vae'], strict=True)
    var.load_state_dict(weights['var'], strict=True)
    del weights
    peak_reset = _reset_peak_rss()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    img_B3HW, label_B = _inputs(sizes, device)
    torch.manual_seed(0)
    if what == 'sample':
        times, keep = _sample_steps(var, label_B, args.steps, dtype)
    else:
        times, keep = _train_steps(vae, var, img_B3HW, label_B, args.steps, live=live, dtype=dtype)
    if args.save_images:
        torch.save(keep.get('images', keep.get('tokens')), args.save_images)
    seconds = statistics.median(times)
    print(json.dumps({'row': args.row, 'module': os.path.abspath(models.__file__), 'var_class_file': inspect.getsourcefile(type(var)),
                      'seconds': seconds, 'images_per_sec': sizes['bs'] / seconds, 'device': str(device), 'dtype': dtype,
                      'steps': times, 'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                      'peak_cuda_gib': torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None,
                      'peak_rss_since': 'weights loaded' if peak_reset else 'process start', 'threads': torch.get_num_threads(),
                      'loss': keep.get('loss')}))


def _child_env(threads: int, device: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}   # nothing but --impl decides what `models` is
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1', HF_HUB_OFFLINE='1')
    if device == 'cpu':   # the CPU comparison: the reference would put its sampling generator on a GPU
        env['CUDA_VISIBLE_DEVICES'] = ''
    return env


def run_side(impl: str, row: str, args, sizes: Dict, weights: str, save: str = '') -> Dict:
    argv = [sys.executable, os.path.join(REPO, 'bench.py'), 'side', f'--impl={impl}', f'--row={row}', f'--sizes={json.dumps(sizes)}',
            f'--weights={weights}', f'--threads={args.threads}', f'--steps={args.steps}', f'--save_images={save}', f'--device={args.device}']
    res = subprocess.run(argv, capture_output=True, text=True, cwd=os.path.dirname(weights), env=_child_env(args.threads, args.device))
    if res.returncode != 0:
        raise RuntimeError(f'the {row} measurement of {impl} failed:\n{res.stderr[-3000:]}')
    return json.loads(res.stdout.strip().splitlines()[-1])


def _save_shared_weights(sizes: Dict, path: str) -> None:
    """Random but sane weights (this code's init) for both sides; the reference's builder leaves the tokenizer uninitialised."""
    from models import build_vae_var
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', **_build_kwargs(sizes))
    torch.save({'vae': vae.state_dict(), 'var': var.state_dict()}, path)


def _stats(values: List[float]) -> Dict:
    return {'rounds': values, 'best': min(values), 'median': statistics.median(values)}


def summarise(runs: List[Dict], rows: Tuple[str, ...]) -> List[Dict]:
    """Per row: best and median of each side over the rounds, seconds (with images/s) and peak memory (resident on the
    CPU, CUDA's allocated peak on a GPU), and the ratios."""
    out = []
    cuda = any(r['peak_cuda_gib'] is not None for r in runs)
    memory, memory_name = ('peak_cuda_gib', 'peak CUDA memory') if cuda else ('peak_rss_gib', 'peak resident memory')
    for row in rows:
        title = ROW_SPECS[row][0]
        for what, unit in (('seconds', 's'), (memory, 'GiB')):
            ref = _stats([r[what] for r in runs if r['row'] == row and r['side'] == 'reference'])
            ours = _stats([r[what] for r in runs if r['row'] == row and r['side'] == 'ours'])
            name = title if what == 'seconds' else f'{memory_name}, {title}'
            s = {'row': row, 'what': what, 'title': name, 'unit': unit, 'reference': ref, 'ours': ours,
                 'ratio_best': ref['best'] / ours['best'], 'ratio_median': ref['median'] / ours['median']}
            if what == 'seconds':   # images per second of the best round
                s['images_per_sec'] = {side: max(r['images_per_sec'] for r in runs if r['row'] == row and r['side'] == side)
                                       for side in ('reference', 'ours')}
            out.append(s)
    return out


def print_table(summary: List[Dict], caption: str, repeat: int, digits: int = 2) -> None:
    print(f'| {caption} | reference, best / median ({repeat} rounds) | this code, best / median ({repeat} rounds) '
          '| ratio (reference / this code), best / median |\n| --- | --- | --- | --- |')
    for s in summary:
        ref, ours = s['reference'], s['ours']
        d = digits if s['what'] == 'seconds' else 2
        ips = s.get('images_per_sec')
        print(f"| {s['title']} | {ref['best']:.{d}f} / {ref['median']:.{d}f} {s['unit']} | {ours['best']:.{d}f} / {ours['median']:.{d}f} "
              f"{s['unit']} | {s['ratio_best']:.2f}x / {s['ratio_median']:.2f}x |"
              + (f" images/s (best): reference {ips['reference']:.1f}, this code {ips['ours']:.1f} |" if ips else ''))


def sanity_lines(tmp: str, runs: List[Dict]) -> Tuple[Dict, List[str]]:
    """Both sides on the same weights: the same token maps for the same images; how far the sampled images and the
    first round's losses lie apart."""
    tok_ref, tok_ours = torch.load(f'{tmp}/tokens_reference.pt'), torch.load(f'{tmp}/tokens_ours.pt')
    n_tok = sum(t.numel() for t in tok_ours)
    n_diff = sum(int((a != b).sum()) for a, b in zip(tok_ref, tok_ours))
    img_diff = float((torch.load(f'{tmp}/images_reference.pt') - torch.load(f'{tmp}/images_ours.pt')).abs().max())
    loss_row = next(r['row'] for r in runs if ROW_SPECS[r['row']][1] == 'train')   # the first training row
    loss = {r['side']: r['loss'] for r in runs if r['row'] == loss_row and r['round'] == 0}
    sanity = {'tokens': n_tok, 'tokens_differing': n_diff, 'sampled_images_max_abs_diff': img_diff, 'train_loss': loss,
              'loss_row': loss_row}
    return sanity, [f'same weights, same images: {n_tok - n_diff} of {n_tok} tokens equal ({n_diff} differ)',
                    f'sampled images (same seed, labels): max |reference - this code| = {img_diff:.2e} in [0, 1]',
                    f"loss of the last timed step ({loss_row}), round 1: reference {loss['reference']:.6f}, this code {loss['ours']:.6f}"]


def _write_json_atomic(obj, path: str) -> None:
    from utils.ckpt import write_bytes_atomic   # the parent process: this repository's utils
    write_bytes_atomic(json.dumps(obj, indent=1).encode(), path)


def measure_interleaved(args, reference: str, sizes: Dict, tmp: str) -> List[Dict]:
    """Every row by both sides, --repeat rounds, each measurement a fresh process; round 1 keeps the token maps and images."""
    weights = os.path.join(tmp, 'weights.pt')
    _save_shared_weights(sizes, weights)
    runs, rows = [], DEVICE_ROWS[args.device]
    first_train = next(row for row in rows if ROW_SPECS[row][1] == 'train' and ROW_SPECS[row][2])   # live: keeps the tokens
    first_sample = next(row for row in rows if ROW_SPECS[row][1] == 'sample')
    for rnd in range(args.repeat):   # interleaved: reference, this code, reference, this code, ...
        for row in rows:
            for name, impl in (('reference', reference), ('ours', REPO)):
                kept = {first_train: 'tokens', first_sample: 'images'}.get(row)
                save = f'{tmp}/{kept}_{name}.pt' if rnd == 0 and kept else ''
                r = run_side(impl, row, args, sizes, weights, save)
                runs.append(dict(r, side=name, round=rnd))
                memory = (f"{r['peak_cuda_gib']:.2f} GiB CUDA peak" if r['peak_cuda_gib'] is not None
                          else f"{r['peak_rss_gib']:.2f} GiB resident peak")
                print(f"round {rnd + 1}/{args.repeat}, {row}, {name}: {r['seconds']:.3f} s, {memory}", flush=True)
    return runs


def compare_reference(args) -> None:
    """The reference implementation and this code side by side: the README's performance table."""
    reference = os.path.abspath(args.reference)
    sizes, info = side_sizes(args), cpu_info(args.threads)
    if args.device == 'cuda':
        info['gpu'] = torch.cuda.get_device_name()
    print(f'command: {args.command}\n{describe_machine(info)}' + (f"\nGPU: {info['gpu']}" if 'gpu' in info else '')
          + f'\nreference: {reference}; this code: {REPO}')
    for line in fast_path_lines():
        print(f'- this code: {line}')
    with tempfile.TemporaryDirectory(prefix='var-bench-') as tmp:
        runs = measure_interleaved(args, reference, sizes, tmp)
        sanity, lines = sanity_lines(tmp, runs)
    modules = {name: sorted({r['module'] for r in runs if r['side'] == name}) for name in ('reference', 'ours')}
    print(f"\nmodels imported: reference {', '.join(modules['reference'])}; this code {', '.join(modules['ours'])}")
    print('\n'.join(lines) + '\n')
    summary = summarise(runs, DEVICE_ROWS[args.device])
    precision = 'float32' if args.device == 'cpu' else f"{info['gpu']}, TF32 on"
    caption = (f"d{sizes['depth']}, batch {sizes['bs']}, {sizes['patch_nums'][-1] * 16} px, {precision}, {args.threads} threads, "
               f"{args.steps} timed step(s) per process")
    print_table(summary, caption, args.repeat, digits=3 if args.device == 'cuda' else 2)   # GPU steps are short
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        _write_json_atomic({'command': args.command, 'machine': info, 'sizes': sizes, 'steps': args.steps, 'repeat': args.repeat,
                            'reference_dir': reference, 'this_code_dir': REPO, 'modules': modules, 'fast_paths': fast_path_lines(),
                            'sanity': sanity, 'summary': summary, 'runs': runs}, os.path.join(args.out_dir, 'compare_reference.json'))


def check_args(args) -> None:
    """Bad flags end in one clear line before anything is built or run."""
    from utils.cli import UserError
    if args.reference is not None and args.what != 'compare':
        raise UserError(f'--reference={args.reference} applies to `bench.py compare` only, not to `bench.py {args.what}`')
    for flag in ('repeat', 'threads', 'steps'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag}={getattr(args, flag)}: must be at least 1')
    if args.reference is not None:
        if not os.path.isfile(os.path.join(args.reference, 'models', '__init__.py')):
            raise UserError(f'--reference={args.reference}: no models/__init__.py there; give the root of a work tree of the '
                            'reference implementation (github.com/FoundationVision/VAR), kept outside this project')
        if args.device not in (None, 'cpu', 'cuda'):
            raise UserError(f'--device={args.device}: compare --reference measures on cpu or cuda')
        if args.device == 'cuda' and not torch.cuda.is_available():
            raise UserError('--device=cuda: no CUDA device is visible here (torch.cuda.is_available() is False); use --device=cpu')


@dataclass
class BenchArgs:
    """Flags of bench.py: the subcommand first, then its flags (one set for all subcommands; check_args refuses the mixes
    that cannot work)."""
    what: str = flag(help='train, sample: time one of them; compare: a table of timed runs (see --reference); cpu: the fast paths '
                          'this CPU gets; side: one measuring process (internal); fsdp: peak memory per process and step time, '
                          'DDP against FSDP2 (bench_fsdp.py)', positional=True,
                     choices=('train', 'sample', 'compare', 'cpu', 'side', 'fsdp'))
    depth: int = flag(8, 'VAR depth of the measured model (compare --quick: 2)', group='model')
    bs: int = flag(4, 'images per step (fsdp: per process; compare --quick: 2)', group='model')
    reso: int = flag(256, 'image side: the 256 or the 512 px scales', choices=(256, 512), group='model')
    dtype: str = flag('fp32', 'fp32, or bf16 / fp16 autocast (fp16 training with a loss scaler, as train.py --fp16=1)',
                      choices=('fp32', 'bf16', 'fp16'), group='model')
    mode: str = flag('fast', "fast: this code as it runs; baseline: every optimisation off (the reference's ops, op for op)",
                     choices=('fast', 'baseline'), group='model')
    tokens: bool = flag(False, 'train: from pre-extracted tokens (no tokenisation in the step)', group='model')
    grad_ckpt: bool = flag(False, 'train: activation checkpointing of the transformer blocks', group='model')
    steps: Optional[int] = flag(None, 'timed steps per process after one warm-up (>= 1); None: 3 (compare --reference and side: 1)',
                                group='benchmark')
    device: Optional[str] = flag(None, 'cpu or cuda; None: cuda where available, else cpu (compare --reference: cpu unless '
                                       '--device=cuda)', group='environment')
    save_images: str = flag('', "train, sample, side: save the last batch's images (or token maps) to this file with torch.save, "
                                "for compare's check; '': none", group='output')
    out_dir: str = flag(os.path.join(REPO, 'local_output', 'bench'), 'compare: where compare.json (compare_reference.json) and the '
                                                                     'sampled images go', group='output')
    repeat: int = flag(3, 'compare: runs of each measurement, interleaved; the table gives medians (>= 1)', group='benchmark')
    quick: bool = flag(False, 'compare: a tiny configuration, to check the script', group='benchmark')
    json: bool = flag(False, 'print one JSON line (used by compare)', group='output')
    tf32: bool = flag(False, 'CUDA: TensorFloat32 for float32 matmuls and convolutions (off: IEEE float32)', group='environment')
    reference: Optional[str] = flag(None, 'compare: time the reference implementation in DIR (a work tree of FoundationVision/VAR) '
                                          'against this code, instead of this code against its --mode=baseline', metavar='DIR',
                                    group='benchmark')
    threads: int = flag(help='compare --reference, fsdp: torch threads of every measuring process (>= 1); default: the CPUs this '
                             'process may use', default_factory=lambda: len(os.sched_getaffinity(0)), group='environment')
    impl: str = flag('', 'side: the implementation to import `models` from (internal, used by compare --reference)',
                     group='benchmark')
    row: str = flag('train_live', 'side: what to measure (internal)', choices=list(ROW_SPECS), group='benchmark')
    sizes: str = flag('{}', 'side: the model sizes as JSON (internal)', group='benchmark')
    weights: str = flag('', 'side: the shared state dicts (internal)', group='benchmark')
    command: str = field(default='', metadata={'derived': True})   # the command line, kept in compare's JSON


def main(argv=None) -> None:
    args = parse_dataclass(BenchArgs, argv, description=__doc__.splitlines()[0])
    args.command = ' '.join(['python bench.py', *(sys.argv[1:] if argv is None else argv)])
    if args.steps is None:
        args.steps = 1 if args.reference is not None or args.what == 'side' else 3
    if args.what == 'side':
        return side(args)
    check_args(args)
    args.device = args.device or ('cpu' if args.reference is not None or not torch.cuda.is_available() else 'cuda')
    if args.what == 'cpu':
        return cpu(args)
    if args.what == 'fsdp':   # bench_fsdp.py: 2 processes each of DDP and FSDP2 on the CPU
        from bench_fsdp import run as bench_fsdp
        return bench_fsdp(args)
    if args.what == 'compare':
        return compare_reference(args) if args.reference is not None else compare(args)
    _set_tf32(torch.device(args.device), args.tf32)
    fn = bench_train if args.what == 'train' else bench_sample
    res = fn(args)
    if args.device.startswith('cuda'):
        res['device_name'] = torch.cuda.get_device_name(torch.device(args.device))
        res['peak_memory_reserved_gb'] = torch.cuda.max_memory_reserved() / 2 ** 30
    print(json.dumps(res) if args.json else json.dumps(res, indent=1))


if __name__ == '__main__':
    sys.path.insert(0, REPO)
    if sys.argv[1:2] == ['side']:   # the measured process: `models` must come from --impl, so nothing of this repo is imported first
        main()
    else:
        from utils.cli import run_main
        run_main(main)
