"""train.py and sample.py end to end on CUDA, and the project's collectives (dist.py) over NCCL.

- train.py through `torchrun --nproc_per_node=1`, killed with SIGKILL (torchrun and its worker, as on a lost machine)
  after a checkpoint, resumes to the weights of an uninterrupted run: the position and AdamW's step counts
  exactly, weights, EMA weights and AdamW moments within 1e-6. On the CPU (test_train.py) they are bit-equal;
  some CUDA kernels add in another order from run to run (atomics, e.g. in the memory-efficient attention
  backward), which moves float32 weights in their last bits, while a resume off by one iteration moves them by
  about the learning rate (7.8e-4 here).
- With one process torchrun starts no process group (dist.py joins one for WORLD_SIZE > 1 only), so NCCL is
  checked on its own: a one-process NCCL group started by torchrun, driving dist.py's collectives.
- sample.py on CUDA writes the same PNG files for --bs 4 and --bs 7 (per-image seeds).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from conftest import REPO, run_script, script_env
from cuda_util import CUDA_MARKS, DEVICE
from test_sample import sample_flags, tiny_ckpts  # noqa: F401 (tiny_ckpts is a fixture)
from test_train import final_weights, train_flags

pytestmark = CUDA_MARKS

RESUME_TOL = 1e-6
TRAIN = ['--bs=4', '--ep=8', '--tblr=0.05', '--ckpt_every_it=7', '--workers=0', '--seed=5', '--hflip=1', '--ema=0.95']


def torchrun(argv):
    """The command conftest.run_script(argv, torchrun_procs=1) runs."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', *argv]


def process_tree(pid: int):
    """pid and all its descendants (from /proc), parents first."""
    children = {}
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                with open(f'/proc/{d}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def kill_all_after_checkpoint(cmd, ckpt_path, timeout=240) -> None:
    """Start cmd; SIGKILL it and every process it started (torchrun's workers run in process groups of their own) as soon
    as ckpt_path appears, as when a machine is lost."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ckpt_path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def max_diff(a: dict, b: dict) -> float:
    """Largest |a − b| over the floating tensors of two state dicts (equal entries, infinities included, count 0)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if a[k].is_floating_point() and a[k].numel():
            d = (a[k].double() - b[k].double()).abs().masked_fill(a[k] == b[k], 0)   # the mask buffers hold -inf
            worst = max(worst, d.max().item() if not d.isnan().any() else float('inf'))
    return worst


def test_torchrun_train_sigkill_and_resume_on_cuda(shapes_data, tiny_vae_ckpt, tmp_path):
    ref = tmp_path / 'uninterrupted'
    run_script(train_flags(shapes_data, tiny_vae_ckpt, ref, *TRAIN), torchrun_procs=1, timeout=300)
    assert f'single process on {DEVICE.type}' in (ref / 'stdout.txt').read_text()

    out = tmp_path / 'killed'
    kill_all_after_checkpoint(torchrun(train_flags(shapes_data, tiny_vae_ckpt, out, *TRAIN)), out / 'ar-ckpt-last.pth')
    ck_at_kill = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ck_at_kill['epoch'], ck_at_kill['iter']) < (8, 0), 'the kill came too late to test a resume'
    res = run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *TRAIN), torchrun_procs=1, timeout=300)
    assert f"at epoch {ck_at_kill['epoch']}, iteration {ck_at_kill['iter']}" in res.stdout

    ck_ref, w_ref = final_weights(ref)
    ck_res, w_res = final_weights(out)
    assert (ck_res['epoch'], ck_res['iter']) == (ck_ref['epoch'], ck_ref['iter']) == (8, 0)
    opt_ref, opt_res = ck_ref['trainer']['var_opt']['optimizer']['state'], ck_res['trainer']['var_opt']['optimizer']['state']
    assert opt_ref.keys() == opt_res.keys() and all(float(opt_ref[i]['step']) == float(opt_res[i]['step']) for i in opt_ref)
    for what, a, b in (('weights', w_ref, w_res), ('EMA weights', ck_ref['trainer']['var_ema'], ck_res['trainer']['var_ema']),
                       ('AdamW exp_avg', {i: s['exp_avg'] for i, s in opt_ref.items()}, {i: s['exp_avg'] for i, s in opt_res.items()})):
        d = max_diff(a, b)
        assert d <= RESUME_TOL, f'{what} differ by {d:.3g} after the resume'


NCCL_SCRIPT = '''
import json, os, sys
import torch
import torch.distributed as tdist
import dist
device = torch.device(sys.argv[1], int(os.environ['LOCAL_RANK'])) if sys.argv[1] == 'cuda' else torch.device('cpu')
if device.type == 'cuda':
    torch.cuda.set_device(device)
tdist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', **({'device_id': device} if device.type == 'cuda' else {}))
on_gpu = torch.arange(4, dtype=torch.float32, device=device)
on_cpu = torch.tensor([1.5, 2.5], dtype=torch.float64)
dist.allreduce(on_gpu)
dist.allreduce(on_cpu)          # dist.py copies CPU tensors to the GPU for NCCL and back
dist.broadcast(on_cpu)
dist.barrier()
gathered = dist.all_gather_object({'rank': dist.get_rank(), 'x': [1, 2]})
obj = dist.broadcast_object({'seed': 7})
print(json.dumps({'backend': tdist.get_backend(), 'world': dist.get_world_size(), 'gpu': on_gpu.cpu().tolist(),
                  'gpu_device': str(on_gpu.device), 'cpu': on_cpu.tolist(), 'cpu_device': str(on_cpu.device),
                  'gathered': gathered, 'obj': obj, 'describe': dist.describe()}))
dist.finalize()
'''


def test_dist_collectives_over_nccl(tmp_path):
    script = tmp_path / 'nccl_check.py'
    script.write_text(NCCL_SCRIPT)
    res = run_script([str(script), DEVICE.type], torchrun_procs=1, timeout=180)
    r = json.loads([line for line in res.stdout.splitlines() if line.startswith('{"backend"')][-1])
    assert r['backend'] == ('nccl' if DEVICE.type == 'cuda' else 'gloo') and r['world'] == 1
    assert r['gpu'] == [0.0, 1.0, 2.0, 3.0] and r['gpu_device'].startswith(DEVICE.type)
    assert r['cpu'] == [1.5, 2.5] and r['cpu_device'] == 'cpu'
    assert r['gathered'] == [{'rank': 0, 'x': [1, 2]}] and r['obj'] == {'seed': 7}
    assert r['describe'].startswith('process group: rank 0 of 1, backend ')


def test_sample_is_deterministic_per_batch_size_and_refuses_another_on_cuda(tiny_ckpts, tmp_path):  # noqa: F811 (the fixture)
    """Two runs with the same --bs give the same bytes; on CUDA another --bs may move pixels by a level (kernels chosen
    by shape), so a rerun in the same --out with another --bs is refused, naming it."""
    outs = [tmp_path / 'a', tmp_path / 'b']
    flags = ['--per_class=3', '--seed=1', '--cfg=2', '--no_npz']
    for out in outs:
        res = run_script(sample_flags(tiny_ckpts, out, *flags, '--bs=4'))
        assert f'single process on {DEVICE.type}' in res.stdout + res.stderr
    names = sorted(n for n in os.listdir(outs[0]) if n.endswith('.png'))   # manifest.json beside them
    assert names == [f'{i:06d}.png' for i in range(15)]
    differ = [n for n in names if (outs[0] / n).read_bytes() != (outs[1] / n).read_bytes()]
    assert not differ, f'two runs with --bs 4 give other PNGs on {DEVICE.type}: {differ}'
    (outs[0] / names[-1]).unlink()   # something left to do, so the rerun must check its settings
    res = run_script(sample_flags(tiny_ckpts, outs[0], *flags, '--bs=7'), check=False)
    assert res.returncode != 0 and '--bs: 4 then, 7 now' in res.stderr and 'Traceback' not in res.stderr, res.stderr[-2000:]
