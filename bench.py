"""Speed and memory benchmarks (not tests): training step and sampling, split by stage, on the CPU or CUDA.

    python bench.py train  --depth=8 --bs=4 --reso=256 --dtype=fp32 [--tf32] [--tokens] [--grad_ckpt] [--mode=baseline]
    python bench.py sample --depth=8 --bs=4 --dtype=fp32 [--tf32] [--mode=baseline]
    python bench.py compare [--repeat=3] [--quick] [--out_dir=DIR]   # the README table: baseline and this code side by side, one machine, one run

`--mode=baseline` switches every optimisation of this codebase off (dense masked attention, F.linear,
whole-batch NCHW direct convs, nearest-upsample-then-conv): what the reference computes, op for op. Each measurement of
`compare` runs in a fresh process, so its peak resident memory is its own. Times are medians of the
timed steps after one warm-up step. The tokenizer weights are random but sane (default init).
Training steps run as train.py's do: the trainer's AmpOptimizer set-up (--dtype=fp16 with its loss scaler),
fused AdamW where available, gradient clipping at 2. On CUDA, peak memory is torch's peak allocation, and
float32 is IEEE float32 unless --tf32 (TensorFloat32 matmuls and convolutions, train.py's default there).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Dict, List

import torch
import torch.nn.functional as F

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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('what', choices=('train', 'sample', 'compare'))
    p.add_argument('--depth', type=int, default=8)
    p.add_argument('--bs', type=int, default=4)
    p.add_argument('--reso', type=int, default=256, choices=(256, 512))
    p.add_argument('--dtype', default='fp32', choices=('fp32', 'bf16', 'fp16'))
    p.add_argument('--mode', default='fast', choices=('fast', 'baseline'))
    p.add_argument('--tokens', action='store_true', help='train from pre-extracted tokens (no tokenisation in the step)')
    p.add_argument('--grad_ckpt', action='store_true')
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--save_images', default='')
    p.add_argument('--out_dir', default=os.path.join(REPO, 'local_output', 'bench'), help='compare: where compare.json and the sampled images go')
    p.add_argument('--repeat', type=int, default=3, help='compare: runs of each measurement, interleaved; the table gives medians')
    p.add_argument('--quick', action='store_true', help='compare: a tiny configuration, to check the script')
    p.add_argument('--json', action='store_true', help='print one JSON line (used by compare)')
    p.add_argument('--tf32', action='store_true', help='CUDA: TensorFloat32 for float32 matmuls and convolutions (off: IEEE float32)')
    args = p.parse_args(argv)
    if args.what == 'compare':
        return compare(args)
    _set_tf32(torch.device(args.device), args.tf32)
    fn = bench_train if args.what == 'train' else bench_sample
    res = fn(args)
    if args.device.startswith('cuda'):
        res['device_name'] = torch.cuda.get_device_name(torch.device(args.device))
        res['peak_memory_reserved_gb'] = torch.cuda.max_memory_reserved() / 2 ** 30
    print(json.dumps(res) if args.json else json.dumps(res, indent=1))


if __name__ == '__main__':
    sys.path.insert(0, REPO)
    main()
