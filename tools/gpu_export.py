"""How long an FID export takes: sample.py writing a set of PNGs and its npz from random-weight d16 checkpoints, timed
from the outside, with the projection to the 50,000 images of an FID set.

    python tools/gpu_export.py --out=DIR --work=SCRATCH                  # on a GPU: 5,000 images (5 per class), fp16
    python tools/gpu_export.py --out=DIR --work=SCRATCH --device=cpu --quick   # dry run: a tiny model, 10 images

The checkpoints are what sample.py reads as --var_ckpt and --vae_ckpt: plain state dicts of models.build_vae_var's
random initialisation (the model's shape from sample.py's flags, --depth=16 and the published tokenizer's), written
under --work. sample.py then runs as for FID (--fp16=1: float16 autocast, cfg 1.5, top-k 900, top-p 0.96), with
--cuda_graphs=1 on CUDA where sample.py has that flag, in a process of its own; this script counts the finished PNGs
in its folder every 0.2 s. Sampling runs at a constant rate per batch, so the figures are: the first PNG's time, the
steady rate (images/s between the first and the last PNG), the startup (the first PNG's time less one batch at that
rate: imports, reading the weights, building, the first batch's graph captures), the tail (the last PNG to the
process's end: the npz closed), and the projection: startup + 50,000 / rate + tail. At --budget_s (counted from the
start of this script's work) sample.py is stopped and the projection comes from the images written by then. Writes DIR/export.json.
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == '__main__':   # run as tools/gpu_export.py: the project's modules are one folder up
    sys.path.insert(0, REPO)
import torch  # noqa: E402

import bench  # noqa: E402  (its `if __name__ == '__main__'` parts do not run on import)
from models import PATCH_NUMS_256, build_vae_var  # noqa: E402
from utils.ckpt import write_bytes_atomic  # noqa: E402
from utils.cli import UserError, run_main  # noqa: E402
from utils.flags import flag, parse_dataclass  # noqa: E402

FID_IMAGES = 50_000
POLL_S = 0.2
# sample.py's model flags for bench.py compare --quick's tiny shape (the published shape needs none besides --depth)
QUICK_MODEL_FLAGS = ['--depth=2', '--pn=1_2_3_4', f"--z_channels={bench.QUICK_SIZES['Cvae']}", f"--vae_ch={bench.QUICK_SIZES['ch']}"]


@dataclass
class ExportArgs:
    """Flags of tools/gpu_export.py."""
    out: str = flag('', 'the folder export.json is written to (created)', metavar='DIR', group='output')
    work: str = flag('', 'scratch folder for the checkpoints and the sample set (created; several GB at d16)', metavar='DIR',
                     group='output')
    device: str = flag('cuda', "cuda, or cpu for the dry run (sample.py then sees no GPU)", choices=('cuda', 'cpu'), group='environment')
    quick: bool = flag(False, 'a tiny model (depth 2, 64 px) and 10 images in batches of 5, to check the script', group='model')
    per_class: int = flag(5, "sample.py --per_class: images per class (with 1000 classes: 5,000 images)", group='sampling')
    num_classes: int = flag(1000, 'sample.py --num_classes: classes 0 .. num_classes-1', group='sampling')
    bs: int = flag(250, 'sample.py --bs: images per batch (5,000 in 20 batches)', group='sampling')
    budget_s: float = flag(0.0, "the seconds this script's work may take (after its imports): sample.py is stopped then and the "
                                'projection made from the images written; 0: no limit', group='benchmark')


def write_checkpoints(work: str, quick: bool, device: torch.device) -> Tuple[str, str, float]:
    """Random-weight tokenizer and VAR as the plain state dicts sample.py reads; their paths and the seconds it took."""
    t = time.perf_counter()
    os.makedirs(work, exist_ok=True)
    kw = bench.build_kwargs(dict(bench.QUICK_SIZES) if quick else {'depth': 16, 'patch_nums': tuple(PATCH_NUMS_256)}, 'cpu')
    torch.manual_seed(0)
    vae, var = build_vae_var(device=device, **kw)
    paths = os.path.join(work, 'vae.pth'), os.path.join(work, 'var.pth')
    for model, path in zip((vae, var), paths):
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    del vae, var
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return paths[0], paths[1], time.perf_counter() - t


def sample_flags() -> Tuple[Optional[set], str]:
    """sample.py's flag names (None where its flags cannot be read) and why not."""
    try:
        return set(importlib.import_module('sample').SampleArgs.__dataclass_fields__), ''
    except Exception as e:   # another change to sample.py may be half made: the export still runs, without extra flags
        return None, f'{type(e).__name__}: {e}'


def count_pngs(folder: str) -> int:
    try:
        with os.scandir(folder) as it:
            return sum(1 for e in it if e.name.endswith('.png'))
    except FileNotFoundError:
        return 0


def summarise(progress: List[Tuple[float, int]], exit_s: float, n_target: int, bs: int) -> Dict:
    """The figures from (seconds since the start, PNGs written) samples and the process's end."""
    seen = [(t, n) for t, n in progress if n > 0]
    if not seen:
        return {'images_written': 0}
    t_first, n_first = seen[0]
    t_last, n_last = next(((t, n) for t, n in seen if n == seen[-1][1]))   # when the final count was first reached
    out = {'images_written': n_last, 'first_png_s': t_first, 'last_png_s': t_last}
    if n_last > n_first and t_last > t_first:
        rate = (n_last - n_first) / (t_last - t_first)
        startup = max(0.0, t_first - bs / rate)
        tail = max(0.0, exit_s - t_last) if n_last >= n_target else 0.0
        out.update(images_per_sec=rate, startup_s=startup, tail_s=tail, projected_50k_s=startup + FID_IMAGES / rate + tail,
                   projected_from_images=n_last - n_first)
    return out


def run(args: ExportArgs) -> Dict:
    started = time.monotonic()
    device = torch.device(args.device)
    out_set = os.path.join(args.work, 'samples', 'set')
    result: Dict = {'device': str(device), 'torch': torch.__version__, 'images': args.per_class * args.num_classes}
    if device.type == 'cuda':
        result['gpu'] = torch.cuda.get_device_name()
    vae_path, var_path, result['checkpoints_s'] = write_checkpoints(os.path.join(args.work, 'ckpt'), args.quick, device)
    names, why = sample_flags()
    argv = [sys.executable, os.path.join(REPO, 'sample.py'), f'--var_ckpt={var_path}', f'--vae_ckpt={vae_path}',
            *(QUICK_MODEL_FLAGS if args.quick else ['--depth=16']), f'--out={out_set}', f'--per_class={args.per_class}',
            f'--num_classes={args.num_classes}', f'--bs={args.bs}', '--fp16=1']
    if names is None:
        result['cuda_graphs'] = f'off: the flags of sample.py could not be read ({why})'
    elif 'cuda_graphs' not in names:
        result['cuda_graphs'] = 'off: sample.py has no --cuda_graphs'
    elif device.type != 'cuda':
        result['cuda_graphs'] = 'off on the CPU'
    else:
        argv.append('--cuda_graphs=1')
        result['cuda_graphs'] = 'on'
    result['command'] = ' '.join(['python', 'sample.py', *argv[2:]])
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
    if device.type == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            process_group=0)   # stopped as a whole group: sample.py and its PNG writers
    stderr_lines: List[str] = []
    progress: List[Tuple[float, int]] = []
    stopped = False
    # the pipe is drained beside the polling, so a chatty sample.py never blocks on it
    reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)
    reader.start()
    while proc.poll() is None:
        now = time.perf_counter() - t0
        progress.append((now, count_pngs(out_set)))
        if args.budget_s and time.monotonic() - started > args.budget_s:
            os.killpg(proc.pid, signal.SIGKILL)   # sample.py and its PNG writers
            stopped = True
            proc.wait()
            break
        time.sleep(POLL_S)
    exit_s = time.perf_counter() - t0
    progress.append((exit_s, count_pngs(out_set)))
    reader.join(timeout=5)
    npz = out_set + '.npz'
    result.update(summarise(progress, exit_s, result['images'], args.bs), exit_code=proc.returncode, total_s=exit_s,
                  npz_bytes=os.path.getsize(npz) if os.path.isfile(npz) else None, stderr_tail=''.join(stderr_lines[-20:])[-3000:])
    if stopped:
        result['status'] = f"stopped at --budget_s={args.budget_s:g} with {result['images_written']} of {result['images']} images"
    elif proc.returncode != 0:
        result['status'] = f"failed: sample.py exit {proc.returncode}: {(stderr_lines or [''])[-1].strip()[:300]}"
    elif result['images_written'] != result['images'] or result['npz_bytes'] is None:
        npz_state = 'written' if result['npz_bytes'] else 'missing'
        result['status'] = f"failed: {result['images_written']} of {result['images']} PNGs, npz {npz_state}"
    else:
        result['status'] = 'measured'
    return result


def describe(r: Dict) -> str:
    if 'images_per_sec' not in r:
        return f"export: {r['status']}"
    return (f"export of {r['images_written']} images: {r['images_per_sec']:.1f} images/s, first PNG after {r['first_png_s']:.1f} s "
            f"(startup {r['startup_s']:.1f} s), tail {r['tail_s']:.1f} s; 50,000 images projected in {r['projected_50k_s']:.0f} s "
            f"({r['projected_50k_s'] / 60:.1f} min); CUDA graphs {r['cuda_graphs']}; {r['status']}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_dataclass(ExportArgs, argv, description=__doc__.splitlines()[0])
    for name in ('out', 'work'):
        if not getattr(args, name):
            raise UserError(f'--{name} is required (e.g. --out=local_output/export --work=/tmp/export)')
    if args.quick:
        args.per_class, args.num_classes, args.bs = 2, 5, 5
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device=cuda: no CUDA device is visible here (torch.cuda.is_available() is False); use --device=cpu')
    result = run(args)
    os.makedirs(args.out, exist_ok=True)
    write_bytes_atomic(json.dumps(result, indent=1).encode(), os.path.join(args.out, 'export.json'))
    print(describe(result))


if __name__ == '__main__':
    run_main(main)
