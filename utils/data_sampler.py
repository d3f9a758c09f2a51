"""Batch samplers: every process reads its own share of every global batch, from any position.

The global batch sequence depends only on the dataset length, the global batch size and the seed,
so a run resumed at iteration `it` of epoch `ep`, with any number of processes, continues with
exactly the batches an uninterrupted run would have used.
"""
from typing import Iterator, List, Tuple

import torch
from torch.utils.data import Sampler

__all__ = ['GlobalBatchSampler', 'EvalShardSampler']


class GlobalBatchSampler(Sampler):
    """Infinite sampler of per-process batches of (epoch, index) pairs.

    Epoch e shuffles all indices with a generator seeded by (seed, e) and, with fill_last, wraps
    around to fill the last global batch. Global batch i is perm[i·G:(i+1)·G]; rank r takes its
    slice [r·b:(r+1)·b] with b = G / world_size.
    """

    def __init__(self, dataset_len: int, glb_batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, fill_last: bool = True, start_ep: int = 0, start_it: int = 0):
        if glb_batch_size % world_size != 0:
            raise ValueError(f'global batch {glb_batch_size} is not divisible by {world_size} processes')
        if dataset_len < 1:
            raise ValueError('the dataset is empty')
        self.dataset_len, self.glb_batch_size = dataset_len, glb_batch_size
        self.world_size, self.rank = world_size, rank
        self.batch_size = glb_batch_size // world_size
        self.seed, self.shuffle, self.fill_last = seed, shuffle, fill_last
        self.iters_per_ep = (dataset_len + glb_batch_size - 1) // glb_batch_size
        self.start_ep, self.start_it = start_ep, start_it

    def __len__(self) -> int:
        return self.iters_per_ep

    def epoch_order(self, epoch: int) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.dataset_len, generator=g)
        else:
            order = torch.arange(self.dataset_len)
        total = self.iters_per_ep * self.glb_batch_size
        if self.fill_last and total > self.dataset_len:
            reps = (total + self.dataset_len - 1) // self.dataset_len
            order = order.repeat(reps)[:total]
        return order.tolist()

    def local_batch(self, order: List[int], epoch: int, it: int) -> List[Tuple[int, int]]:
        g0 = it * self.glb_batch_size
        glb = order[g0:g0 + self.glb_batch_size]
        return [(epoch, i) for i in glb[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch, it = self.start_ep, self.start_it
        while True:
            order = self.epoch_order(epoch)
            while it < self.iters_per_ep:
                batch = self.local_batch(order, epoch, it)
                if batch:
                    yield batch
                it += 1
            epoch, it = epoch + 1, 0


class EvalShardSampler(Sampler):
    """Each process evaluates a contiguous shard of the indices, without padding or repeats."""

    def __init__(self, dataset_len: int, world_size: int = 1, rank: int = 0):
        per = [dataset_len // world_size + (1 if r < dataset_len % world_size else 0) for r in range(world_size)]
        begin = sum(per[:rank])
        self.indices = list(range(begin, begin + per[rank]))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
