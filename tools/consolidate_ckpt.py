"""A sharded checkpoint of train.py / train_vae.py --fsdp=1 (a DCP folder) as one file in the layout these scripts write
without --fsdp: what sample.py, the notebook and the reference's code load, and what a DDP run resumes from.

    python tools/consolidate_ckpt.py local_output/ar-ckpt-last.dcp                   # writes local_output/ar-ckpt-last.pth
    python tools/consolidate_ckpt.py local_output/ar-ckpt-best.dcp --out=best.pth

One process, on the CPU: every shard file is checked against the folder's manifest (sha256), the whole tensors are
read (DCP joins the shards of any number of processes), and the file is written atomically with its payload checksum.
It needs the memory of the whole checkpoint (weights, optimizer moments, EMA).
"""
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root

from utils.flags import flag, parse_dataclass  # noqa: E402  (standard library only)


@dataclass
class ConsolidateArgs:
    """Flags of tools/consolidate_ckpt.py."""
    folder: str = flag('', 'the checkpoint folder (<name>.dcp) of a --fsdp=1 run', positional=True)
    out: str = flag('', "the file to write; '': the folder's name with .pth, beside it", group='output')
    overwrite: bool = flag(False, 'replace an existing --out file', group='output')


def consolidate(folder: str, out: str) -> dict:
    """Write the checkpoint in `folder` to the single file `out`; the checkpoint dict."""
    import torch
    from utils.ckpt import CheckpointDamagedError, save_atomic, with_checksum
    from utils.dcp_ckpt import META, ShardedStore, fill_tensors, marked_keys, read_full
    problem = ShardedStore().verify(folder)
    if problem is not None:
        raise CheckpointDamagedError(f'{folder}: {problem}')
    rest = torch.load(os.path.join(folder, META), map_location='cpu', weights_only=True)
    ckpt = fill_tensors(rest, read_full(folder))
    missing = marked_keys(ckpt)
    if missing:
        raise CheckpointDamagedError(f'{folder}: the shard files lack {len(missing)} tensors that {META} lists, e.g. {missing[:3]}')
    save_atomic(with_checksum(ckpt), out)
    return ckpt


def main(args: ConsolidateArgs) -> None:
    from utils.cli import UserError
    folder = args.folder.rstrip('/')
    if not os.path.isdir(folder):
        raise UserError(f'{args.folder}: no such folder (give the <name>.dcp folder that train.py --fsdp=1 wrote)')
    out = args.out or (folder[:-len('.dcp')] if folder.endswith('.dcp') else folder) + '.pth'
    if os.path.exists(out) and not args.overwrite:
        raise UserError(f'{out} exists: pass --overwrite to replace it, or --out=<another file>')
    ckpt = consolidate(folder, out)
    print(f'{out}: epoch {ckpt.get("epoch")}, iteration {ckpt.get("iter")}, written by {ckpt.get("args", {}).get("world_size")} '
          f'processes; loads like a checkpoint of a run without --fsdp')


if __name__ == '__main__':
    from utils.cli import run_main
    run_main(lambda: main(parse_dataclass(ConsolidateArgs, description=__doc__.split('\n\n')[0])))
