"""`bench.py fsdp`: peak resident memory per process and time per training step, DDP against FSDP2 (--fsdp=1), on the CPU.

    python bench.py fsdp --depth=16 --bs=2 --steps=3 [--threads=1] [--dtype=bf16] [--json]

Each mode runs as 2 real processes of one gloo group (started here with the environment torchrun sets). Every
process builds the tokenizer (frozen, replicated: as train.py keeps it) and VAR, wraps VAR with
utils.parallel.wrap_for_training (DDP, or each block and the root fully_shard), builds train.py's optimizer (AdamW
over the reference's groups, AmpOptimizer with gradient clipping at 2), then trains from random token maps of --bs
images per process: one warm-up step, then --steps timed ones (the median is reported). The peak resident memory
(ru_maxrss) counts from the moment the model is wrapped and its optimizer built (Linux: reset then through
/proc/self/clear_refs), so the whole model each process builds before fully_shard keeps only its shard does not count;
the `build_peak_gib` field has the peak since the process started.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List

from utils.flags import flag, parse_dataclass   # the standard library only

REPO = os.path.dirname(os.path.abspath(__file__))

__all__ = ['run']


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def worker(mode: str, depth: int, bs: int, steps: int, dtype: str) -> Dict:
    """One process of one mode: wrap, then train; its figures."""
    import types

    import torch

    import dist
    from models import build_vae_var
    from utils.amp_opt import AmpOptimizer, build_adamw
    from utils.lr_control import filter_params
    from utils.parallel import wrap_for_training
    device = dist.initialize(force_cpu=True)
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', depth=depth, num_classes=1000, flash_if_available=False, fused_if_available=False)
    build_peak = _rss_gib()
    from bench import MIXED_PRECISION, _reset_peak_rss   # train.py's --fp16 per dtype; restarting ru_maxrss: as bench.py does
    fp16 = MIXED_PRECISION[dtype]
    wrapped = wrap_for_training(var, types.SimpleNamespace(fsdp=int(mode == 'fsdp'), fp16=fp16), device, blocks=var.blocks)
    names, paras, groups = filter_params(var)
    opt = AmpOptimizer('cpu', fp16, build_adamw(groups, lr=1e-4, fused=True), names, paras, grad_clip=2.0)
    reset = _reset_peak_rss()
    g = torch.Generator().manual_seed(dist.get_rank())
    gt_idx_Bl = [torch.randint(0, vae.vocab_size, (bs, pn * pn), generator=g) for pn in var.patch_nums]
    gt_BL = torch.cat(gt_idx_Bl, dim=1)
    label_B = torch.randint(0, 1000, (bs,), generator=g)
    with torch.no_grad():
        x_BLCv = vae.quantize.idxBl_to_var_input(gt_idx_Bl)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with opt.amp_ctx:
            logits_BLV = wrapped(label_B, x_BLCv)
            loss = torch.nn.functional.cross_entropy(logits_BLV.view(-1, logits_BLV.shape[-1]).float(), gt_BL.view(-1), label_smoothing=0.1)
        opt.backward_clip_step(stepping=True, loss=loss)
        times.append(time.perf_counter() - t)
    out = {'mode': mode, 'rank': dist.get_rank(), 'world_size': dist.get_world_size(), 'depth': depth, 'bs_per_process': bs,
           'dtype': dtype, 'params_m': sum(p.numel() for p in var.parameters()) / 1e6,
           'seconds_per_step': statistics.median(times[1:]), 'steps': times[1:], 'peak_rss_gib': _rss_gib(),
           'peak_rss_since': 'wrapped, optimizer built' if reset else 'process start', 'build_peak_gib': build_peak}
    dist.barrier()
    dist.finalize()
    return out


@dataclass
class WorkerArgs:
    """The arguments of one measuring process, in the order _launch passes them."""
    mode: str = flag(help='ddp: VAR wrapped in DDP; fsdp: each block and the root sharded with FSDP2', positional=True,
                     choices=('ddp', 'fsdp'), metavar='mode')
    depth: int = flag(help='VAR depth (bench.py --depth)', positional=True)
    bs: int = flag(help='images per process and step (bench.py --bs)', positional=True)
    steps: int = flag(help='timed steps after one warm-up (bench.py --steps)', positional=True)
    dtype: str = flag(help='fp32, bf16 or fp16 (bench.py --dtype)', positional=True, choices=('fp32', 'bf16', 'fp16'),
                      metavar='dtype')
    out: str = flag(help="the JSON file to write this process's figures to", positional=True)


def _launch(mode: str, args, procs: int) -> List[Dict]:
    """`procs` worker processes of one mode; their results, by rank."""
    import dist
    threads = str(args.threads)
    base = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, CUDA_VISIBLE_DEVICES='', HF_HUB_OFFLINE='1')
    with tempfile.TemporaryDirectory() as tmp:
        running = []
        for rank, env in enumerate(dist.local_group_envs(procs, base)):
            out = os.path.join(tmp, f'{rank}.json')
            argv = [sys.executable, os.path.abspath(__file__), mode, str(args.depth), str(args.bs), str(args.steps), args.dtype, out]
            running.append((subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True), out))
        results = []
        for p, out in running:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f'the {mode} measurement failed (exit {p.returncode}):\n{err[-3000:]}')
            with open(out) as f:
                results.append(json.load(f))
    return results


def _launch_or_failure(mode: str, args, procs: int):
    """The mode's results, or why it failed (a DDP run of a model too large for the machine's memory is killed:
    that is the point of sharding, so the other mode is still measured)."""
    try:
        return _launch(mode, args, procs)
    except RuntimeError as e:
        killed = 'Connection closed by peer' in str(e) or 'exit -9' in str(e)
        return f'failed{" (a process was killed: out of memory?)" if killed else ""}: {str(e).splitlines()[0][:200]}'


def run(args) -> None:
    """bench.py fsdp: both modes one after the other; a table, or one JSON line with --json."""
    procs = 2
    rows = {mode: _launch_or_failure(mode, args, procs) for mode in ('ddp', 'fsdp')}
    if args.json:
        print(json.dumps({'procs': procs, 'threads': args.threads, 'runs': rows}))
        return
    params = next((rs[0]['params_m'] for rs in rows.values() if not isinstance(rs, str)), float('nan'))
    print(f'VAR d{args.depth} ({params:.1f}M parameters), {procs} processes (gloo, CPU), {args.bs} images each, '
          f'{args.dtype}, {args.threads} threads each; peak RSS since the model was wrapped')
    print(f'{"mode":6} {"rank":>4} {"peak RSS GiB":>13} {"build peak GiB":>15} {"s/step":>8}')
    for mode, rs in rows.items():
        if isinstance(rs, str):
            print(f'{mode:6} {rs}')
            continue
        for r in rs:
            print(f'{mode:6} {r["rank"]:>4} {r["peak_rss_gib"]:>13.3f} {r["build_peak_gib"]:>15.3f} {r["seconds_per_step"]:>8.3f}')
    if any(isinstance(rs, str) for rs in rows.values()):
        raise SystemExit(1)


if __name__ == '__main__':   # one measuring process, started by _launch with the environment torchrun sets
    a_ = parse_dataclass(WorkerArgs, description='One measuring process of `bench.py fsdp` (started by it; run `bench.py fsdp` '
                                                 'instead).')
    res = worker(a_.mode, a_.depth, a_.bs, a_.steps, a_.dtype)
    with open(a_.out, 'w') as f_:
        json.dump(res, f_)
