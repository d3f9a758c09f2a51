"""The largest training batch per GPU size: peak CUDA memory of bench.py's training step (live tokenisation, bf16
autocast, fused AdamW, 256 px) for d16, d20, d24 and d30, with and without activation checkpointing (var.grad_ckpt).

    python tools/gpu_memory.py --out=DIR                                   # on a GPU
    python tools/gpu_memory.py --out=DIR --device=cpu --quick              # dry run: tiny models, resident memory

Per depth, one model (random weights) and one optimizer: a warm-up step (it creates AdamW's moments and the library
workspaces, which then stay), then one measured step per (checkpointing, batch): CUDA's peak allocation
(max_memory_allocated) over that step alone, everything the step keeps and makes. Two batches give the line
peak = a + b * batch; the largest batch of a card is the largest with a + b * batch <= its memory minus --margin_gib
(the CUDA context and the allocator's fragmentation, which max_memory_allocated does not count). A card's memory is what
PyTorch reports as its total on cards of that nominal size (CARDS_GIB: a little below the nominal GB), and the card
measured on by its own total. An entry is 'measured' where that batch was actually run and its
peak fitted (the measured batches, and then, while the depth's share of --budget_s lasts, each entry up to
--verify_max_batch, smallest first), else 'fit'. A configuration that runs out of memory is recorded as such; the
others still run.
Writes DIR/memory.json after every measurement and prints the table.
"""
import gc
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == '__main__':   # run as tools/gpu_memory.py: the project's modules are one folder up
    sys.path.insert(0, REPO)
import torch  # noqa: E402

import bench  # noqa: E402  (its `if __name__ == '__main__'` parts do not run on import)
from models import PATCH_NUMS_256, build_vae_var  # noqa: E402
from utils.ckpt import write_bytes_atomic  # noqa: E402
from utils.cli import UserError, run_main  # noqa: E402
from utils.flags import flag, parse_dataclass  # noqa: E402

# nominal size → about the total PyTorch reports there (torch.cuda.get_device_properties().total_memory), in GiB
CARDS_GIB = {'24 GB': 23.6, '40 GB': 39.4, '80 GB': 79.2, '141 GB': 139.8}


@dataclass
class MemoryArgs:
    """Flags of tools/gpu_memory.py."""
    out: str = flag('', 'the folder memory.json is written to (created)', metavar='DIR', group='output')
    device: str = flag('cuda', 'cuda: peak CUDA allocation; cpu: the dry run (peak resident memory)', choices=('cuda', 'cpu'),
                       group='environment')
    depths: str = flag('16,20,24,30', 'VAR depths, comma-separated', group='model')
    batches: str = flag('8,16', 'the two batch sizes measured for the fit, comma-separated', group='model')
    quick: bool = flag(False, "bench.py compare --quick's tiny model shape (64 px, a narrow tokenizer), to check the script",
                       group='model')
    margin_gib: float = flag(1.5, "GiB of a card kept free: the CUDA context and the allocator's fragmentation", group='benchmark')
    verify_max_batch: int = flag(256, "a card's entry is run to check it (time allowing) only up to this batch", group='benchmark')
    budget_s: float = flag(0.0, 'no measurement is started once this many seconds have passed (the rest is fit or not run); '
                                '0: no limit', group='benchmark')


def _reset_peak(device: torch.device) -> None:
    bench._sync(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    else:
        bench._reset_peak_rss()


def _peak_gib(device: torch.device) -> float:
    bench._sync(device)
    return bench._peak_memory_gb(device)


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e).lower()


class DepthRun:
    """One depth's model, optimizer and inputs; measure(batch, ckpt) runs one step and gives its peak."""

    def __init__(self, depth: int, sizes: Dict, device: torch.device):
        torch.manual_seed(0)
        self.sizes, self.device = dict(sizes, depth=depth), device
        self.vae, self.var = build_vae_var(device=device, **bench.build_kwargs(self.sizes, device.type))
        self.var.train()
        self.opt = bench.reference_optimizer(self.var)

    def step(self, batch: int, ckpt: bool) -> None:
        self.var.grad_ckpt = ckpt
        img_B3HW, label_B = bench.make_inputs(dict(self.sizes, bs=batch), self.device)
        bench.train_step(self.vae, self.var, self.opt, None, img_B3HW, label_B, None, 'bf16')

    def measure(self, batch: int, ckpt: bool) -> float:
        _reset_peak(self.device)
        self.step(batch, ckpt)
        return _peak_gib(self.device)

    def close(self) -> None:
        del self.vae, self.var, self.opt
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()


def fit_line(peaks: Dict[int, float]) -> Optional[Tuple[float, float]]:
    """(a, b) of peak = a + b * batch through the two smallest measured batches; None without two, or where memory
    does not grow with the batch."""
    if len(peaks) < 2:
        return None
    (b1, p1), (b2, p2) = sorted(peaks.items())[:2]
    slope = (p2 - p1) / (b2 - b1)
    return (p1 - slope * b1, slope) if slope > 0 else None


def largest_batch(line: Tuple[float, float], usable_gib: float) -> int:
    a, b = line
    return max(0, math.floor((usable_gib - a) / b))


def run(args: MemoryArgs) -> Dict:
    device = torch.device(args.device)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base = {k: v for k, v in bench.QUICK_SIZES.items() if k not in ('depth', 'bs')} if args.quick else {'patch_nums': tuple(PATCH_NUMS_256)}
    depths = [int(d) for d in args.depths.split(',') if d.strip()]
    batches = sorted({int(b) for b in args.batches.split(',') if b.strip()})
    cards = dict(CARDS_GIB)
    if device.type == 'cuda':
        cards[f'this card ({torch.cuda.get_device_name()})'] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    result = {'device': str(device), 'torch': torch.__version__, 'margin_gib': args.margin_gib, 'cards_gib': cards,
              'what': 'peak CUDA allocation (max_memory_allocated)' if device.type == 'cuda' else 'peak resident memory (dry run)',
              'step': "bench.py's training step: live tokenisation, bf16 autocast, fused AdamW", 'batches': batches, 'models': {}}
    t0 = time.monotonic()
    path = os.path.join(args.out, 'memory.json')
    os.makedirs(args.out, exist_ok=True)

    def save() -> None:
        result['seconds'] = time.monotonic() - t0
        write_bytes_atomic(json.dumps(result, indent=1).encode(), path)

    def time_left() -> bool:
        return not args.budget_s or time.monotonic() - t0 < args.budget_s

    for n_depth, depth in enumerate(depths):
        # the checking runs of a depth stop at its share of the budget, so that every depth gets measured
        share_end = t0 + args.budget_s * (n_depth + 1) / len(depths)
        model = result['models'][f'd{depth}'] = {c: {'measured': {}, 'status': 'not run'} for c in ('ckpt_off', 'ckpt_on')}
        if not time_left():
            for m in model.values():
                m['status'] = f'not run: --budget_s={args.budget_s:g} spent'
            save()
            continue
        run_ = None
        try:
            run_ = DepthRun(depth, base, device)
            run_.step(batches[0], False)   # warm-up: AdamW's moments and the libraries' workspaces from here on
            for ckpt in (False, True):
                m = model['ckpt_on' if ckpt else 'ckpt_off']
                m['status'] = 'measured'
                for batch in batches:
                    if not time_left():
                        m['status'] = f'not run: --budget_s={args.budget_s:g} spent'
                        break
                    try:
                        m['measured'][str(batch)] = run_.measure(batch, ckpt)
                    except Exception as e:
                        if not _out_of_memory(e):
                            raise
                        m['measured'][str(batch)] = None
                        m['status'] = f'out of memory at batch {batch}'
                        run_.opt.zero_grad(set_to_none=True)
                        break
                    print(f"d{depth}, grad_ckpt {'on' if ckpt else 'off'}, batch {batch}: {m['measured'][str(batch)]:.2f} GiB", flush=True)
                    save()
            fill_cards(model, cards, args, run_, lambda: not args.budget_s or time.monotonic() < share_end, save)
        except Exception as e:   # this depth is recorded as failed; the next one still runs
            traceback.print_exc()
            for m in model.values():
                if m['status'] in ('not run', 'measured'):
                    m['status'] = f'failed: {type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:200]}'
        finally:
            if run_ is not None:
                run_.close()
        save()
    return result


def fill_cards(model: Dict, cards: Dict[str, float], args: MemoryArgs, run_: DepthRun, time_left, save) -> None:
    """Each configuration's fit and its largest batch per card; then entries run to check them, smallest batch first."""
    checks: List[Tuple[int, str, str]] = []
    for key, m in model.items():
        peaks = {int(b): p for b, p in m['measured'].items() if p is not None}
        line = fit_line(peaks)
        m['fit'] = None if line is None else {'a_gib': line[0], 'b_gib_per_image': line[1]}
        m['max_batch'] = {}
        for card, total in cards.items():
            usable = total - args.margin_gib
            if line is None:
                fits = [b for b, p in peaks.items() if p <= usable]
                m['max_batch'][card] = {'batch': max(fits), 'how': 'measured (no fit)'} if fits else None
                continue
            n = largest_batch(line, usable)
            entry = {'batch': n, 'how': 'measured' if n in peaks and peaks[n] <= usable else 'fit', 'usable_gib': usable}
            m['max_batch'][card] = entry
            if entry['how'] == 'fit' and 0 < n <= args.verify_max_batch:
                checks.append((n, key, card))
    done: Dict[Tuple[int, str], Optional[float]] = {}
    for n, key, card in sorted(checks):
        if not time_left():
            break
        entry = model[key]['max_batch'][card]
        if (n, key) not in done:
            try:
                done[(n, key)] = run_.measure(n, key == 'ckpt_on')
            except Exception as e:
                if not _out_of_memory(e):
                    raise
                done[(n, key)] = None
                run_.opt.zero_grad(set_to_none=True)
        peak = entry['checked_peak_gib'] = done[(n, key)]
        entry['how'] = 'measured' if peak is not None and peak <= entry['usable_gib'] else 'fit (run: did not fit)'
        save()


def print_table(result: Dict) -> None:
    cards = list(result['cards_gib'])
    b1, b2 = result['batches'][:2]
    print(f"\nlargest training batch per card ({result['what']}; a card's memory minus {result['margin_gib']:g} GiB for the "
          'CUDA context and fragmentation; measured: that batch was run and fitted, fit: from the line)\n'
          f"| model | grad ckpt | peak @{b1} | peak @{b2} | GiB per image | {' | '.join(cards)} |\n" + '| --- ' * (5 + len(cards)) + '|')
    for name, model in result['models'].items():
        for key, m in model.items():
            peaks = [m['measured'].get(str(b)) for b in (b1, b2)]
            cells = [('–' if p is None else f'{p:.2f}') for p in peaks]
            fit = m.get('fit')
            per_image = '–' if not fit else f"{fit['b_gib_per_image']:.3f}"
            entries = []
            for card in cards:
                e = (m.get('max_batch') or {}).get(card)
                entries.append('–' if e is None else f"{e['batch']} ({e['how']})")
            status = '' if m['status'] == 'measured' else f" [{m['status']}]"
            print(f"| {name}{status} | {'on' if key == 'ckpt_on' else 'off'} | {cells[0]} | {cells[1]} | {per_image} | {' | '.join(entries)} |")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_dataclass(MemoryArgs, argv, description=__doc__.splitlines()[0])
    if not args.out:
        raise UserError('--out is required: the folder memory.json goes to (e.g. --out=local_output/memory)')
    try:
        depths = [int(d) for d in args.depths.split(',') if d.strip()]
        batches = {int(b) for b in args.batches.split(',') if b.strip()}
    except ValueError:
        raise UserError(f'--depths={args.depths} --batches={args.batches}: give integers, comma-separated (e.g. --depths=16,20 '
                        '--batches=8,16)') from None
    if not depths or min(depths) < 1 or len(batches) < 2 or min(batches) < 1:
        raise UserError(f'--depths={args.depths} --batches={args.batches}: at least one depth and two distinct batch sizes, all >= 1')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device=cuda: no CUDA device is visible here (torch.cuda.is_available() is False); use --device=cpu')
    print_table(run(args))


if __name__ == '__main__':
    run_main(main)
