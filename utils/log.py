"""Logging set-up for the scripts: rank 0 logs INFO to the console and to a file, other ranks warnings only."""
import logging
import os
import sys
from typing import Optional

__all__ = ['setup_logging']


def setup_logging(rank: int = 0, log_file: Optional[str] = None, level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger once for a script (never at import time)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f'[%(asctime)s{"" if rank == 0 else f" rank{rank}"}] %(message)s', datefmt='%m-%d %H:%M:%S')
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if rank == 0 and log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file, mode='a')
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel(level if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)
    return root
