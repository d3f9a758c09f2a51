"""models/kernels/heap.py: inside `large_buffers_from_heap` a freed large buffer's pages serve the next one (no new
page faults), outside they are faulted in anew; the tokenizer's CPU inference runs inside it, training does not."""
import resource

import pytest
import torch

from conftest import build_tiny
from models.kernels import fast_paths, heap, memory

needs_glibc = pytest.mark.skipif(heap.glibc() is None, reason='the C library is not glibc')

MB42 = 42 * 2 ** 20 // 4   # floats: the published tokenizer's 160 channels at 256 px


def faults_of_allocations(n: int = 4) -> int:
    """Page faults of allocating, filling and freeing a 42 MB tensor n times (the first two, which may grow the heap,
    not counted)."""
    for _ in range(2):
        torch.empty(MB42).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(MB42).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096


@needs_glibc
def test_inside_freed_large_buffers_serve_the_next_without_page_faults_and_go_back_on_the_way_out():
    pages = 4 * MB42 * 4 // 4096
    outside = faults_of_allocations()
    with heap.large_buffers_from_heap():
        inside = faults_of_allocations()
        with heap.large_buffers_from_heap():   # nested: the same setting
            nested = faults_of_allocations()
        again = faults_of_allocations()        # still inside the outer one
        held = [torch.ones(MB42) for _ in range(4)]
        del held                                # 168 MB freed into the heap, still resident while inside
        before_exit = resident_bytes()
    assert resident_bytes() < before_exit - 3 * MB42 * 4, 'malloc_trim hands the freed memory back on the way out'
    assert outside > 0.9 * pages, outside       # outside: a fresh mapping, faulted in, each time
    assert inside < 0.05 * pages and nested < 0.05 * pages and again < 0.05 * pages, (inside, nested, again)


def test_tokenizer_inference_runs_inside_it_and_training_does_not(monkeypatch):
    entered = []
    real = memory.large_buffers_from_heap
    monkeypatch.setattr(memory, 'large_buffers_from_heap', lambda: entered.append(1) or real())
    vae, _ = build_tiny()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        tokens = vae.img_to_idxBl(img)
        assert len(entered) == 1
        with fast_paths(False):
            assert [torch.equal(a, b) for a, b in zip(vae.img_to_idxBl(img), tokens)] and len(entered) == 1
    vae.decoder(vae.post_quant_conv(torch.randn(1, vae.Cvae, 4, 4)))   # with autograd: no
    assert len(entered) == 1
