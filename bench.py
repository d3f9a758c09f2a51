"""Speed and memory benchmarks (not tests): training step and sampling, split by stage, on the CPU or CUDA.

    python bench.py train  --depth=8 --bs=4 --reso=256 --dtype=fp32 [--tf32] [--tokens] [--grad_ckpt] [--mode=baseline]
    python bench.py sample --depth=8 --bs=4 --dtype=fp32 [--tf32] [--mode=baseline]
    python bench.py compare --reference=DIR [--depth=8] [--bs=4] [--repeat=3] [--threads=N] [--steps=1] [--quick] [--out_dir=DIR]
    python bench.py compare --reference=DIR --device=cuda --depth=16 --bs=32 --steps=2 [--budget_s=180] [--rows=...]   # on a GPU
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
fused AdamW. The reference runs its two rows as its own code runs: a training step with live tokenisation under
bfloat16 autocast, and sampling under float16 autocast (the reference notebook's). This code runs variants, each timed
against one of those two rows: the live step eager (today's default) and with utils.compile.compile_blocks, the step
from pre-extracted tokens with compile_blocks (held against the reference's live step: its trainer tokenises every
step) and eager, sampling eager and with utils.sampling_graphs.use_cuda_graphs. A round runs the reference's row, then
the variants paired with it, each a fresh process. A variant's compilation or graph capture happens in its two warm-up
steps, outside the timed ones; their seconds are reported too (TorchInductor's cache, TORCHINDUCTOR_CACHE_DIR or its
default folder, is shared by the fresh processes, so later rounds compile from it). A variant whose feature is missing
or refuses is recorded as 'unavailable: why'. Peak memory is CUDA's peak allocation after the weights are loaded; each
row also gives images/s. --budget_s ends the comparison early, with every measurement so far in the table and JSON
(written after each one).

`--mode=baseline` switches every optimisation of this codebase off (dense masked attention, F.linear,
whole-batch NCHW direct convs, nearest-upsample-then-conv): what the reference computes, op for op. Each measurement of
`compare` runs in a fresh process, so its peak resident memory is its own. Times are medians of the
timed steps after one warm-up step. The tokenizer weights are random but sane (default init).
Training steps run as train.py's do: the trainer's AmpOptimizer set-up (--dtype=fp16 with its loss scaler),
fused AdamW where available, gradient clipping at 2. On CUDA, peak memory is torch's peak allocation, and
float32 is IEEE float32 unless --tf32 (TensorFloat32 matmuls and convolutions, train.py's default there).
"""
import importlib
import inspect
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
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
    if args.mode == 'fast':   # baseline: the plain models, the reference's ops
        from utils.cpu_speed import speed_up   # here, as `models` above: see the imports at the top
        speed_up(vae, var)
    return vae, var


def optimizer_step(var, opt, scaler) -> None:
    """Both trainers' step after backward: unscale (float16's loss scaler), clip at 2, AdamW step, gradients dropped."""
    if scaler is not None:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


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
        optimizer_step(var, opt, scaler)
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
    """Which fast path this code takes on this machine, and why (cpu_kernels decides; see describe_choices)."""
    from cpu_kernels import describe_choices
    from cpu_kernels.choices import describe_attention
    return describe_choices() + [
        describe_attention(),
        'oneDNN linear, Winograd and the C attention kernel are chosen by the CPU rule table of cpu_kernels/cpu_rules.py (vendor, ISA flags, cores; '
        'never by timing); the size thresholds were measured on a 2-core AMD EPYC with AVX-512',
        'OpenMP\'s idle spin: every measuring process of `compare`, the reference\'s as well as this code\'s, starts with the '
        'environment bench.py was started with (nothing sets it: cpu_kernels/threads.py)',
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
    'train_live_bf16_compiled': ('training step, live tokenisation, bf16 autocast, compile_blocks', 'train', True, 'bf16'),
    'train_tokens_bf16_compiled': ('training step, pre-extracted tokens, bf16 autocast, compile_blocks', 'train', False, 'bf16'),
    'train_tokens_bf16': ('training step, pre-extracted tokens, bf16 autocast', 'train', False, 'bf16'),
    'sample_fp16_graphs': ('sampling a batch, fp16 autocast, use_cuda_graphs', 'sample', None, 'fp16'),
    'sample_fp16_compiled_graphs': ('sampling a batch, fp16 autocast, compile_blocks + use_cuda_graphs', 'sample', None, 'fp16'),
}
# this code's speed features a row switches on, in this order (this code's only: the reference never runs these rows)
ROW_FEATURES = {'train_live_bf16_compiled': ('compile_blocks',), 'train_tokens_bf16_compiled': ('compile_blocks',),
                'sample_fp16_graphs': ('use_cuda_graphs',), 'sample_fp16_compiled_graphs': ('compile_blocks', 'use_cuda_graphs')}
FEATURE_MODULES = {'compile_blocks': 'utils.compile', 'use_cuda_graphs': 'utils.sampling_graphs'}
# a row of this code → the reference's row it is timed against (the row itself where absent). The steps from tokens are
# held against the reference's live step: its trainer tokenises every step, so that is the step they replace.
PAIRED_WITH = {'train_live_bf16_compiled': 'train_live_bf16', 'train_tokens_bf16_compiled': 'train_live_bf16',
               'train_tokens_bf16': 'train_live_bf16', 'sample_fp16_graphs': 'sample_fp16', 'sample_fp16_compiled_graphs': 'sample_fp16'}
# compile_blocks + use_cuda_graphs is left out of the CUDA default to keep the prepared GPU check within its budget:
# sampling's ten scale shapes would be compiled in every fresh process (--rows adds it)
DEVICE_ROWS = {'cpu': ('train_live', 'train_tokens', 'sample'),
               'cuda': ('train_live_bf16', 'train_live_bf16_compiled', 'train_tokens_bf16_compiled', 'train_tokens_bf16',
                        'sample_fp16', 'sample_fp16_graphs')}
FEATURE_WARMUP_STEPS = 2   # a variant with a speed feature: compilation or capture, then a step that catches a recompile
QUICK_SIZES = dict(depth=2, bs=2, patch_nums=(1, 2, 3, 4), ch=32, Cvae=8)   # 64 px, a tokenizer 5x narrower: to check the harness


def side_sizes(args) -> Dict:
    if args.quick:
        return dict(QUICK_SIZES)
    from models import PATCH_NUMS_256, PATCH_NUMS_512
    return dict(depth=args.depth, bs=args.bs, patch_nums={256: PATCH_NUMS_256, 512: PATCH_NUMS_512}[args.reso])


def build_kwargs(sizes: Dict, device: str = 'cpu') -> Dict:
    kw = {k: v for k, v in sizes.items() if k != 'bs'}
    # flash-attn / xformers / the fused MLP are CUDA kernels: off on the CPU so neither side reaches for them; on CUDA each
    # side's default (both fall back to PyTorch's SDPA and MLP where the packages are not installed)
    cuda = device.startswith('cuda')
    return dict(kw, patch_nums=tuple(kw['patch_nums']), shared_aln=kw['depth'] >= 36, flash_if_available=cuda, fused_if_available=cuda)


def make_inputs(sizes: Dict, device: str = 'cpu'):
    g = torch.Generator().manual_seed(0)
    reso = sizes['patch_nums'][-1] * 16
    img_B3HW = torch.rand(sizes['bs'], 3, reso, reso, generator=g) * 2 - 1
    label_B = torch.randint(0, 1000, (sizes['bs'],), generator=g)
    return img_B3HW.to(device), label_B.to(device)


def tokenise(vae, img_B3HW):
    with torch.no_grad():   # the VAE's parameters are frozen on both sides: no graph either way
        idx_Bl = vae.img_to_idxBl(img_B3HW)
        return idx_Bl, torch.cat(idx_Bl, 1), vae.quantize.idxBl_to_var_input(idx_Bl)


def _no_mark(name: str):
    return nullcontext()


def reference_optimizer(var) -> torch.optim.Optimizer:
    """The reference trainer's AdamW (fused, as both trainers build it by default: the reference's and this project's
    --afuse=True; PyTorch has a fused AdamW on the CPU too)."""
    return torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)


def train_step(vae, var, opt, scaler, img_B3HW, label_B, tokens=None, dtype: str = 'fp32', mark=_no_mark) -> Tuple[torch.Tensor, List]:
    """The reference trainer's step: logits under its autocast (tokenisation outside it), label-smoothed cross entropy,
    backward (float16: through a loss scaler, unscaled before clipping), clip at 2, the optimiser's step.
    tokens: tokenise's output (pre-extracted), None: tokenise img_B3HW here, inside mark('tokenizer') (a context, for
    the profiler). Returns (the loss, the token maps)."""
    if tokens is None:
        with mark('tokenizer'):
            tokens = tokenise(vae, img_B3HW)
    idx_Bl, gt_BL, x_BLCv = tokens
    with _amp(img_B3HW.device, dtype):
        logits_BLV = var(label_B, x_BLCv)
        loss = F.cross_entropy(logits_BLV.view(-1, logits_BLV.shape[-1]), gt_BL.view(-1), label_smoothing=0.1)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    optimizer_step(var, opt, scaler)
    return loss, idx_Bl


def _train_steps(vae, var, img_B3HW, label_B, steps: int, live: bool, dtype: str = 'fp32', warmup: int = 1, after_warmup=None):
    """`warmup` untimed steps then `steps` timed ones of train_step; after_warmup() is called between them."""
    var.train()
    device = img_B3HW.device
    opt = reference_optimizer(var)
    scaler = torch.amp.GradScaler(device.type) if dtype == 'fp16' else None
    tokens = None if live else tokenise(vae, img_B3HW)   # pre-extracted: outside the timed region
    times, loss = [], None
    for i in range(warmup + steps):
        if i == warmup and after_warmup is not None:
            after_warmup()
        _sync(device)
        t = time.perf_counter()
        loss, idx_Bl = train_step(vae, var, opt, scaler, img_B3HW, label_B, tokens, dtype)
        _sync(device)
        times.append(time.perf_counter() - t)
    return times[warmup:], {'loss': loss.item(), 'tokens': [t.cpu() for t in idx_Bl], 'warmup_s': times[:warmup]}


def sample_batch(var, label_B, dtype: str = 'fp32') -> torch.Tensor:
    """autoregressive_infer_cfg as the comparison calls it on both sides: images (B, 3, H, W) in [0, 1]."""
    with torch.inference_mode(), _amp(label_B.device, dtype):
        return var.autoregressive_infer_cfg(len(label_B), label_B, g_seed=0, cfg=1.5, top_k=900, top_p=0.96, more_smooth=False)


def _sample_steps(var, label_B, steps: int, dtype: str = 'fp32', warmup: int = 1, after_warmup=None, vae=None):
    """`warmup` untimed calls then `steps` timed ones. With vae, the tokens drawn in the last call are kept too, seen
    where both implementations look them up in the codebook (vae.quantize.embedding) after each scale's draw."""
    var.eval()
    device = label_B.device
    times, img, drawn = [], None, []
    for i in range(warmup + steps):
        if i == warmup and after_warmup is not None:
            after_warmup()
        hook = (vae.quantize.embedding.register_forward_pre_hook(lambda module, inputs: drawn.append(inputs[0].clone()))
                if vae is not None and i == warmup + steps - 1 else None)
        _sync(device)
        t = time.perf_counter()
        img = sample_batch(var, label_B, dtype)
        _sync(device)
        times.append(time.perf_counter() - t)
        if hook is not None:
            hook.remove()
    return times[warmup:], {'images': img.float().cpu().clone(), 'drawn_tokens': [t.cpu() for t in drawn], 'warmup_s': times[:warmup]}


def _reset_peak_rss() -> bool:
    """Start ru_maxrss afresh from the current resident set (Linux: /proc/self/clear_refs); False where refused."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def apply_features(var, features: Tuple[str, ...]):
    """var with this code's speed features switched on, in order (FEATURE_MODULES: where each lives). Returns (the model,
    'measured' or 'unavailable: why', the seconds the calls took): a feature that is missing or refuses this model or
    device is a finding of the comparison, not an end to it."""
    t = time.perf_counter()
    for name in features:
        where = f'{FEATURE_MODULES[name]}.{name}'
        try:
            fn = getattr(importlib.import_module(FEATURE_MODULES[name]), name)
        except (ImportError, AttributeError) as e:
            return var, f'unavailable: {where} cannot be imported ({_first_line(e)})', 0.0
        try:
            var = fn(var)
        except Exception as e:   # e.g. no CUDA or no Triton here: the row says so
            return var, f'unavailable: {where}(var) raised {_first_line(e)}', 0.0
    return var, 'measured', time.perf_counter() - t


class _CudaPeaks:
    """CUDA's peak allocation since the weights were loaded, and over the timed steps alone (reset after the warm-up)."""

    def __init__(self, device: torch.device):
        self.device, self.warmup_peak = device, 0
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)

    def after_warmup(self) -> None:
        if self.device.type == 'cuda':
            self.warmup_peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def gib(self) -> Tuple[Optional[float], Optional[float]]:
        if self.device.type != 'cuda':
            return None, None
        timed = torch.cuda.max_memory_allocated(self.device)
        return max(timed, self.warmup_peak) / 2 ** 30, timed / 2 ** 30


def side(args) -> None:
    """One measurement in this fresh process, by the implementation in --impl (its `models` first on sys.path). A row
    that cannot be measured still prints its JSON line, with status 'unavailable: why' or 'failed: why'."""
    t_start = time.perf_counter()
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
    features = ROW_FEATURES.get(args.row, ())
    torch.manual_seed(0)
    vae, var = models.build_vae_var(device=device, **build_kwargs(sizes, device.type))
    weights = torch.load(args.weights, map_location='cpu', mmap=True)
    vae.load_state_dict(weights['vae'], strict=True)
    var.load_state_dict(weights['var'], strict=True)
    del weights
    if impl == REPO:   # this code's side, converted for the CPU as the scripts are; the reference's as it is
        from utils.cpu_speed import speed_up   # after `import models` from --impl
        speed_up(vae, var)
    peak_reset = _reset_peak_rss()
    peaks = _CudaPeaks(device)
    img_B3HW, label_B = make_inputs(sizes, device)
    setup_s = time.perf_counter() - t_start
    var, status, feature_s = apply_features(var, features)
    torch.manual_seed(0)
    times, keep, warmup = [], {}, FEATURE_WARMUP_STEPS if features else 1
    if status == 'measured':
        try:
            if what == 'sample':
                times, keep = _sample_steps(var, label_B, args.steps, dtype, warmup, peaks.after_warmup, vae if args.save_images else None)
            else:
                times, keep = _train_steps(vae, var, img_B3HW, label_B, args.steps, live=live, dtype=dtype, warmup=warmup,
                                           after_warmup=peaks.after_warmup)
        except Exception as e:   # e.g. out of memory, or a compiler error in a variant: the line below says which
            traceback.print_exc()
            status = f"failed: {'/'.join(features) or 'eager'} {what} step raised {_first_line(e)}"
    if args.save_images and keep:
        torch.save({'images': keep['images'], 'drawn_tokens': keep['drawn_tokens']} if what == 'sample' else keep['tokens'],
                   args.save_images)
    seconds = statistics.median(times) if times else None
    try:
        peak_cuda, peak_cuda_timed = peaks.gib()
    except RuntimeError:   # a CUDA error of the step above is already the finding
        peak_cuda = peak_cuda_timed = None
    print(json.dumps({'row': args.row, 'module': os.path.abspath(models.__file__), 'var_class_file': inspect.getsourcefile(type(var)),
                      'seconds': seconds, 'images_per_sec': sizes['bs'] / seconds if seconds else None, 'device': str(device),
                      'dtype': dtype, 'steps': times, 'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                      'peak_cuda_gib': peak_cuda, 'peak_rss_since': 'weights loaded' if peak_reset else 'process start',
                      'threads': torch.get_num_threads(), 'loss': keep.get('loss'), 'status': status, 'features': list(features),
                      'warmup_s': keep.get('warmup_s', []), 'feature_call_s': feature_s, 'setup_s': setup_s,
                      'peak_cuda_timed_gib': peak_cuda_timed,
                      'inductor_cache_dir': os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default') if features else None}))


def _child_env(threads: int, device: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}   # nothing but --impl decides what `models` is
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1', HF_HUB_OFFLINE='1')
    if device == 'cpu':   # the CPU comparison: the reference would put its sampling generator on a GPU
        env['CUDA_VISIBLE_DEVICES'] = ''
    return env


def run_side(impl: str, row: str, args, sizes: Dict, weights: str, save: str = '', timeout: Optional[float] = None) -> Dict:
    """One measuring process; its JSON line, or {'row', 'status': 'failed: why' or 'not finished: why'} where it broke or
    was stopped after `timeout` seconds (its whole process group: TorchInductor's compile workers too)."""
    argv = [sys.executable, os.path.join(REPO, 'bench.py'), 'side', f'--impl={impl}', f'--row={row}', f'--sizes={json.dumps(sizes)}',
            f'--weights={weights}', f'--threads={args.threads}', f'--steps={args.steps}', f'--save_images={save}', f'--device={args.device}']
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(weights),
                            env=_child_env(args.threads, args.device), process_group=0)   # stopped as a whole group
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:   # it ended just now
            pass
        out, err = proc.communicate()
        return {'row': row, 'status': f'not finished: stopped after {timeout:.0f} s, when --budget_s={args.budget_s:g} was spent',
                'process_s': time.perf_counter() - t, 'stderr_tail': err[-3000:]}
    elapsed = time.perf_counter() - t
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (err.strip().splitlines() or [''])[-1][:300]
        return {'row': row, 'status': f'failed: exit {proc.returncode}: {last}', 'process_s': elapsed, 'stderr_tail': err[-3000:]}
    r = json.loads(lines[-1])
    if r.get('status', 'measured') != 'measured':
        r['stderr_tail'] = err[-3000:]
    return dict(r, process_s=elapsed)


def _save_shared_weights(sizes: Dict, path: str) -> None:
    """Random but sane weights (this code's init) for both sides; the reference's builder leaves the tokenizer uninitialised."""
    from models import build_vae_var
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', **build_kwargs(sizes))
    torch.save({'vae': vae.state_dict(), 'var': var.state_dict()}, path)


def _stats(values: List[float]) -> Optional[Dict]:
    return {'rounds': values, 'best': min(values), 'median': statistics.median(values)} if values else None


def _groups(rows: Tuple[str, ...]) -> List[Tuple[str, List[str]]]:
    """[(a row of the reference, the rows of this code timed against it)], in the order `rows` first names them."""
    groups: Dict[str, List[str]] = {}
    for row in rows:
        groups.setdefault(PAIRED_WITH.get(row, row), []).append(row)
    return list(groups.items())


def _measured(r: Dict) -> bool:
    return r.get('status', 'measured') == 'measured'


def _row_status(ours: List[Dict], ref: List[Dict]) -> str:
    """'measured', or what kept the row (or some of its rounds) from being measured."""
    bad = [r['status'] for r in ours if not _measured(r)] + [f"the reference's row: {r['status']}" for r in ref if not _measured(r)]
    if not bad:
        return 'measured'
    n_ok = sum(map(_measured, ours))
    return bad[0] if n_ok == 0 else f'measured in {n_ok} of {len(ours)} rounds; also {bad[0]}'


MEMORY_NAMES = {'peak_cuda_gib': 'peak CUDA memory', 'peak_rss_gib': 'peak resident memory'}


def summarise(runs: List[Dict], rows: Tuple[str, ...]) -> List[Dict]:
    """Per row of this code: best and median over the rounds of it and of the reference's row it is timed against
    (reference_row), seconds (with images/s and the warm-up seconds) and peak memory (resident on the CPU, CUDA's
    allocated peak on a GPU), and the ratios; None where a side has no measurement (status says why)."""
    out = []
    memory = 'peak_cuda_gib' if any(r.get('peak_cuda_gib') is not None for r in runs if _measured(r)) else 'peak_rss_gib'
    memory_name = MEMORY_NAMES[memory]
    for row in rows:
        title, ref_row = ROW_SPECS[row][0], PAIRED_WITH.get(row, row)
        by = {'reference': [r for r in runs if r['row'] == ref_row and r['side'] == 'reference'],
              'ours': [r for r in runs if r['row'] == row and r['side'] == 'ours']}
        ok = {side: [r for r in rs if _measured(r)] for side, rs in by.items()}
        status = _row_status(by['ours'], by['reference'])
        for what, unit in (('seconds', 's'), (memory, 'GiB')):
            ref, ours = (_stats([r[what] for r in ok[side] if r.get(what) is not None]) for side in ('reference', 'ours'))
            name = title if what == 'seconds' else f'{memory_name}, {title}'
            s = {'row': row, 'what': what, 'title': name, 'unit': unit, 'reference': ref, 'ours': ours,
                 'ratio_best': ref['best'] / ours['best'] if ref and ours else None,
                 'ratio_median': ref['median'] / ours['median'] if ref and ours else None, 'reference_row': ref_row, 'status': status}
            if what == 'seconds':   # images per second of the best round; the warm-up steps' seconds of every round
                s['images_per_sec'] = {side: max((r['images_per_sec'] for r in ok[side]), default=None) for side in ok}
                s['warmup_s'] = {side: [r.get('warmup_s', []) for r in ok[side]] for side in ok}
            out.append(s)
    return out


def print_table(summary: List[Dict], caption: str, repeat: int, digits: int = 2) -> None:
    print(f'| {caption} | reference, best / median ({repeat} rounds) | this code, best / median ({repeat} rounds) '
          '| ratio (reference / this code), best / median |\n| --- | --- | --- | --- |')
    for s in summary:
        ref, ours = s['reference'], s['ours']
        if ref is None or ours is None:
            print(f"| {s['title']} | {_pair(ref, digits, s['unit'])} | {_pair(ours, digits, s['unit'])} | {s['status']} |")
            continue
        d = digits if s['what'] == 'seconds' else 2
        ips = s.get('images_per_sec')
        print(f"| {s['title']} | {ref['best']:.{d}f} / {ref['median']:.{d}f} {s['unit']} | {ours['best']:.{d}f} / {ours['median']:.{d}f} "
              f"{s['unit']} | {s['ratio_best']:.2f}x / {s['ratio_median']:.2f}x |"
              + (f" images/s (best): reference {ips['reference']:.1f}, this code {ips['ours']:.1f} |" if ips else ''))


def _pair(stats: Optional[Dict], digits: int, unit: str) -> str:
    return '–' if stats is None else f"{stats['best']:.{digits}f} / {stats['median']:.{digits}f} {unit}"


def _num(x: Optional[float], fmt: str) -> str:
    return '–' if x is None else format(x, fmt)


def print_variant_table(summary: List[Dict], caption: str, repeat: int) -> None:
    """One line per variant of this code: its seconds against its reference row's, images/s, peak memory, warm-up."""
    mem = {s['row']: s for s in summary if s['what'] != 'seconds'}
    memory_name = MEMORY_NAMES[next(iter(mem.values()))['what']]
    print(f'| {caption}: this code | timed against the reference\'s | reference, best / median | this code, best / median '
          f'({repeat} rounds) | ratio, best / median | images/s (best): reference, this code | {memory_name} (median): reference, '
          'this code | warm-up s, this code (per round) |\n| --- | --- | --- | --- | --- | --- | --- | --- |')
    notes = []
    for s in (s for s in summary if s['what'] == 'seconds'):
        m, ips = mem[s['row']], s['images_per_sec']
        warm = '; '.join('+'.join(f'{w:.1f}' for w in ws) for ws in s['warmup_s']['ours']) or '–'
        print(f"| {s['row']} | {s['reference_row']} | {_pair(s['reference'], 3, 's')} | {_pair(s['ours'], 3, 's')} "
              f"| {_num(s['ratio_best'], '.2f')}x / {_num(s['ratio_median'], '.2f')}x "
              f"| {_num(ips['reference'], '.1f')}, {_num(ips['ours'], '.1f')} "
              f"| {_num(m['reference'] and m['reference']['median'], '.2f')}, {_num(m['ours'] and m['ours']['median'], '.2f')} GiB "
              f"| {warm} |")
        if s['status'] != 'measured':
            notes.append(f"- {s['row']}: {s['status']}")
    if notes:
        print('\n'.join(notes))


def _load_kept(path: str):
    return torch.load(path) if os.path.isfile(path) else None


def _drawn_differing(a: List[torch.Tensor], b: List[torch.Tensor]) -> Tuple[int, Optional[int]]:
    """(tokens, how many differ) of two sampling calls' drawn tokens; None differing where they cannot be lined up."""
    n = sum(t.numel() for t in a)
    if not a or len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return n, None
    return n, sum(int((x != y).sum()) for x, y in zip(a, b))


def sanity_lines(tmp: str, runs: List[Dict], rows: Tuple[str, ...]) -> Tuple[Dict, List[str]]:
    """Both sides on the same weights: the same token maps for the same images (the first live training row); how far
    the sampled images and the first round's losses lie apart; a sampling variant of this code against the reference and
    against this code's eager sampling (its drawn tokens must be the same)."""
    groups, sanity, lines = _groups(rows), {'variants': {}}, []
    first_train = next((ref for ref, _ in groups if ROW_SPECS[ref][1] == 'train' and ROW_SPECS[ref][2]), None)
    tok_ref, tok_ours = (_load_kept(f'{tmp}/tokens_{side}_{first_train}.pt') for side in ('reference', 'ours'))
    if tok_ref is not None and tok_ours is not None:
        n_tok = sum(t.numel() for t in tok_ours)
        n_diff = sum(int((a != b).sum()) for a, b in zip(tok_ref, tok_ours))
        sanity.update(tokens=n_tok, tokens_differing=n_diff, tokens_row=first_train)
        lines.append(f'same weights, same images: {n_tok - n_diff} of {n_tok} tokens equal ({n_diff} differ)')
    elif first_train is not None:
        lines.append(f'token maps ({first_train}): not compared, a side has none')
    for ref_row, ours_rows in groups:
        if ROW_SPECS[ref_row][1] != 'sample':
            continue
        ref = _load_kept(f'{tmp}/images_reference_{ref_row}.pt')
        eager = _load_kept(f'{tmp}/images_ours_{ref_row}.pt')
        for row in ours_rows:
            got = _load_kept(f'{tmp}/images_ours_{row}.pt')
            vs_ref = float((ref['images'] - got['images']).abs().max()) if ref is not None and got is not None else None
            n, drawn_diff = _drawn_differing(ref['drawn_tokens'], got['drawn_tokens']) if ref is not None and got is not None else (0, None)
            if row == ref_row:
                if 'sampled_images_max_abs_diff' not in sanity:
                    sanity.update(sampled_images_max_abs_diff=vs_ref, sampled_tokens=n, sampled_tokens_differing=drawn_diff)
                    lines.append(f'sampled images ({ref_row}): not compared, a side has none' if vs_ref is None else
                                 f'sampled images (same seed, labels): max |reference - this code| = {vs_ref:.2e} in [0, 1]')
                continue
            vs_eager = float((eager['images'] - got['images']).abs().max()) if eager is not None and got is not None else None
            n_e, drawn_vs_eager = (_drawn_differing(eager['drawn_tokens'], got['drawn_tokens']) if eager is not None and got is not None
                                   else (0, None))
            sanity['variants'][row] = {'images_max_abs_diff_vs_reference': vs_ref, 'drawn_tokens_differing_vs_reference': drawn_diff,
                                       'images_max_abs_diff_vs_eager': vs_eager, 'drawn_tokens': n_e,
                                       'drawn_tokens_differing_vs_eager': drawn_vs_eager,
                                       'same_tokens_as_eager': drawn_vs_eager == 0 if drawn_vs_eager is not None else None}
            lines.append(f'sampled images, {row}: max |reference - this code| = {_num(vs_ref, ".2e")}; against this code\'s '
                         f'eager {ref_row}: max |diff| = {_num(vs_eager, ".2e")}, drawn tokens differing: '
                         f'{_num(drawn_vs_eager, "d")} of {n_e} (must be 0)')
    train_rows = [r['row'] for r in runs if ROW_SPECS[r['row']][1] == 'train']
    if train_rows:
        loss_row = train_rows[0]   # the first training row
        loss = {r['side']: r['loss'] for r in runs if r['row'] == loss_row and r['round'] == 0 and _measured(r)}
        sanity.update(train_loss=loss, loss_row=loss_row)
        if len(loss) == 2:
            lines.append(f"loss of the last timed step ({loss_row}), round 1: reference {loss['reference']:.6f}, this code {loss['ours']:.6f}")
    return sanity, lines


def _write_json_atomic(obj, path: str) -> None:
    from utils.ckpt import write_bytes_atomic   # the parent process: this repository's utils
    write_bytes_atomic(json.dumps(obj, indent=1).encode(), path)


MIN_SIDE_S = 20.0   # --budget_s: a measuring process is not started with less left (nor with less than its last round took)


def compared_rows(args) -> Tuple[str, ...]:
    """--rows: '' the device's rows, 'cpu' or 'cuda' that device's, else the rows named."""
    if args.rows in ('', 'cpu', 'cuda'):
        return DEVICE_ROWS[args.rows or args.device]
    return tuple(r.strip() for r in args.rows.split(',') if r.strip())


def measure_interleaved(args, reference: str, sizes: Dict, tmp: str, rows: Tuple[str, ...], progress=None,
                        deadline: Optional[float] = None) -> List[Dict]:
    """--repeat rounds, each a fresh process per measurement: the reference's row, then this code's rows timed against
    it (on the CPU: each row by both sides). Round 1 keeps the token maps of the first live training row and every
    sampling row's images. progress(runs) after every measurement; past `deadline` (time.monotonic()) no process is
    started, and a running one is stopped there."""
    weights = os.path.join(tmp, 'weights.pt')
    _save_shared_weights(sizes, weights)
    groups = _groups(rows)
    first_train = next((ref for ref, _ in groups if ROW_SPECS[ref][1] == 'train' and ROW_SPECS[ref][2]), None)
    took: Dict[Tuple[str, str], float] = {}   # (side, row) → seconds of its last process: does another one fit?
    runs: List[Dict] = []
    for rnd in range(args.repeat):   # interleaved: reference, this code, reference, this code, ...
        for ref_row, ours_rows in groups:
            for name, impl, row in [('reference', reference, ref_row)] + [('ours', REPO, r) for r in ours_rows]:
                kept = 'tokens' if row == first_train else 'images' if ROW_SPECS[row][1] == 'sample' else None
                save = f'{tmp}/{kept}_{name}_{row}.pt' if rnd == 0 and kept else ''
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left < max(MIN_SIDE_S, took.get((name, row), 0.0)):
                    r = {'row': row, 'status': f'not run: {max(left, 0):.0f} s of --budget_s={args.budget_s:g} left, less than its '
                                               'measuring process takes'}
                else:
                    r = run_side(impl, row, args, sizes, weights, save, timeout=left)
                    took[(name, row)] = r['process_s']
                runs.append(dict(r, side=name, round=rnd))
                if _measured(r):
                    memory = (f"{r['peak_cuda_gib']:.2f} GiB CUDA peak" if r['peak_cuda_gib'] is not None
                              else f"{r['peak_rss_gib']:.2f} GiB resident peak")
                    warm = f", warm-up {'+'.join(f'{w:.1f}' for w in r['warmup_s'])} s" if r.get('features') else ''
                    print(f"round {rnd + 1}/{args.repeat}, {row}, {name}: {r['seconds']:.3f} s, {memory}{warm}", flush=True)
                else:
                    print(f"round {rnd + 1}/{args.repeat}, {row}, {name}: {r['status']}", flush=True)
                    if r.get('stderr_tail'):
                        print(r['stderr_tail'], file=sys.stderr, flush=True)
                if progress is not None:
                    progress(runs)
    return runs


def compare_reference(args) -> None:
    """The reference implementation and this code side by side: the README's performance table."""
    deadline = time.monotonic() + args.budget_s if args.budget_s > 0 else None   # --budget_s: from here
    reference = os.path.abspath(args.reference)
    sizes, info, rows = side_sizes(args), cpu_info(args.threads), compared_rows(args)
    if args.device == 'cuda':
        info['gpu'] = torch.cuda.get_device_name()
    print(f'command: {args.command}\n{describe_machine(info)}' + (f"\nGPU: {info['gpu']}" if 'gpu' in info else '')
          + f'\nreference: {reference}; this code: {REPO}')
    for line in fast_path_lines():
        print(f'- this code: {line}')
    out_json = os.path.join(args.out_dir, 'compare_reference.json') if args.out_dir else None

    def payload(runs: List[Dict], sanity: Optional[Dict], complete: bool) -> Dict:
        modules = {name: sorted({r['module'] for r in runs if r['side'] == name and 'module' in r}) for name in ('reference', 'ours')}
        return {'command': args.command, 'machine': info, 'sizes': sizes, 'steps': args.steps, 'repeat': args.repeat, 'rows': list(rows),
                'reference_dir': reference, 'this_code_dir': REPO, 'modules': modules, 'fast_paths': fast_path_lines(),
                'complete': complete, 'sanity': sanity, 'summary': summarise(runs, rows), 'runs': runs}

    def progress(runs: List[Dict]) -> None:   # a comparison stopped from outside still leaves every measurement so far
        if out_json:
            os.makedirs(args.out_dir, exist_ok=True)
            _write_json_atomic(payload(runs, None, False), out_json)

    with tempfile.TemporaryDirectory(prefix='var-bench-') as tmp:
        runs = measure_interleaved(args, reference, sizes, tmp, rows, progress, deadline)
        sanity, lines = sanity_lines(tmp, runs, rows)
    result = payload(runs, sanity, True)
    print(f"\nmodels imported: reference {', '.join(result['modules']['reference'])}; this code {', '.join(result['modules']['ours'])}")
    print('\n'.join(lines) + '\n')
    caption = f"d{sizes['depth']}, batch {sizes['bs']}, {sizes['patch_nums'][-1] * 16} px"
    if rows == DEVICE_ROWS['cpu']:
        precision = 'float32' if args.device == 'cpu' else f"{info['gpu']}, TF32 on"
        print_table(result['summary'], f"{caption}, {precision}, {args.threads} threads, {args.steps} timed step(s) per process",
                    args.repeat, digits=3 if args.device == 'cuda' else 2)   # GPU steps are short
    else:
        where = f"{info['gpu']}, TF32 on" if args.device == 'cuda' else f'CPU, {args.threads} threads'
        print_variant_table(result['summary'], f'{caption}, {where}, {args.steps} timed step(s) per process', args.repeat)
    if out_json:
        os.makedirs(args.out_dir, exist_ok=True)
        _write_json_atomic(result, out_json)
    failed = [r for r in runs if r['status'].startswith('failed')]
    if failed:
        raise RuntimeError(f"{len(failed)} measurement(s) failed; the first, {failed[0]['row']} of the {failed[0]['side']} side: "
                           f"{failed[0]['status']}\n{failed[0].get('stderr_tail', '')}")


def check_args(args) -> None:
    """Bad flags end in one clear line before anything is built or run."""
    from utils.cli import UserError
    if args.reference is not None and args.what != 'compare':
        raise UserError(f'--reference={args.reference} applies to `bench.py compare` only, not to `bench.py {args.what}`')
    for flag in ('repeat', 'threads', 'steps'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag}={getattr(args, flag)}: must be at least 1')
    if not args.budget_s >= 0:   # nan too
        raise UserError(f'--budget_s={args.budget_s}: must be 0 (no limit) or the seconds the comparison may take')
    for name in ('rows', 'budget_s'):
        if getattr(args, name) != BenchArgs.__dataclass_fields__[name].default and args.reference is None:
            raise UserError(f'--{name}={getattr(args, name)} applies to `bench.py compare --reference=DIR` only')
    if args.reference is not None:
        if not os.path.isfile(os.path.join(args.reference, 'models', '__init__.py')):
            raise UserError(f'--reference={args.reference}: no models/__init__.py there; give the root of a work tree of the '
                            'reference implementation (github.com/FoundationVision/VAR), kept outside this project')
        if args.device not in (None, 'cpu', 'cuda'):
            raise UserError(f'--device={args.device}: compare --reference measures on cpu or cuda')
        unknown = [r for r in compared_rows(args) if r not in ROW_SPECS] if args.rows not in ('', 'cpu', 'cuda') else []
        if unknown or (args.rows not in ('', 'cpu', 'cuda') and not compared_rows(args)):
            raise UserError(f'--rows={args.rows}: {", ".join(unknown) or "no row"} is not a row; give cpu, cuda or rows among '
                            f'{", ".join(ROW_SPECS)}, comma-separated')
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
    rows: str = flag('', "compare --reference: the rows, comma-separated (see ROW_SPECS), or 'cpu' / 'cuda' for that device's "
                         "set; '': the --device's set", group='benchmark')
    budget_s: float = flag(0.0, 'compare --reference: the seconds it may take; once spent no measuring process is started '
                                '(a running one is stopped) and the table holds the rounds done; 0: no limit', group='benchmark')
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
