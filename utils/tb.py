"""Tensorboard scalars and images, written by rank 0 only."""
from typing import Optional

__all__ = ['TensorboardLogger']


class TensorboardLogger:
    def __init__(self, log_dir: Optional[str], enabled: bool = True):
        self.writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=log_dir, flush_secs=30)

    def update(self, head: str, step: int, **scalars) -> None:
        if self.writer is None:
            return
        for k, v in scalars.items():
            if v is None:
                continue
            if hasattr(v, 'item'):
                v = v.item()
            self.writer.add_scalar(f'{head}/{k}', float(v), global_step=step)

    def image(self, tag: str, step: int, img_HW3) -> None:
        """One (H, W, 3) uint8 image (e.g. utils.imgs.make_grid's) under `tag`."""
        if self.writer is None:
            return
        self.writer.add_image(tag, img_HW3, global_step=step, dataformats='HWC')

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
