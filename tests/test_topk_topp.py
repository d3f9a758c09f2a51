"""The fast top-k + top-p filter (no sort of all V) draws the same tokens as the reference's full sort, bit for bit."""
import contextlib

import pytest
import torch

import models.helpers as helpers
from models.helpers import sample_with_top_k_top_p_, top_k_top_p_filter_reference_


@contextlib.contextmanager
def fast_filter(on: bool):
    """The fast filter as it is (on), or refusing every call (off: the reference's full sort runs)."""
    real = helpers._top_k_top_p_filter_fast_
    if not on:
        helpers._top_k_top_p_filter_fast_ = lambda *a: False
    try:
        yield
    finally:
        helpers._top_k_top_p_filter_fast_ = real


def _both(logits_BlV, k, p, seed=0):
    """(filtered, drawn) of the fast path and of the reference path on copies of logits_BlV."""
    out = []
    for on in (True, False):
        x = logits_BlV.clone()
        with fast_filter(on):
            idx = sample_with_top_k_top_p_(x, top_k=k, top_p=p, rng=torch.Generator().manual_seed(seed), num_samples=2)
        out.append((x, idx))
    return out


def _cases():
    g = torch.Generator().manual_seed(1)
    for B, l, V in [(1, 1, 64), (2, 3, 64), (1, 7, 257), (2, 16, 1024), (4, 256, 4096)]:
        for kind in ('normal', 'ties', 'inf', 'dominant'):
            if kind == 'ties':
                x = torch.randint(0, 20, (B, l, V), generator=g).float()
            else:
                x = torch.randn(B, l, V, generator=g) * [0.3, 1.0, 5.0][(B + l) % 3]
            if kind == 'inf':
                x[torch.rand(B, l, V, generator=g) < 0.3] = -torch.inf
            if kind == 'dominant':
                x[..., 3] += 30.0
            ks = sorted({1, 2, 50, 900, V - 1, V} & set(range(1, V + 1)))
            if V == 4096:   # the published sampling only, to keep the test to seconds
                ks = [900] if kind != 'ties' else [900, 50]
            for k in ks:
                for p in (0.5, 0.9, 0.96, 0.999):
                    yield x, k, p


def test_fast_equals_reference_exactly():
    for x, k, p in _cases():
        (fast_x, fast_idx), (ref_x, ref_idx) = _both(x, k, p)
        assert torch.equal(fast_x, ref_x), (tuple(x.shape), k, p)
        assert torch.equal(fast_idx, ref_idx), (tuple(x.shape), k, p)


def test_nan_rows_fall_back_untouched():
    x = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(2))
    x[1, 0, 5] = torch.nan
    fast_x = x.clone()
    with fast_filter(True):
        assert helpers._top_k_top_p_filter_fast_(fast_x, 10, 0.9) is False   # left to the reference
    torch.testing.assert_close(fast_x, x, rtol=0, atol=0, equal_nan=True)   # untouched on fallback


def test_tie_inside_top_p_cut_falls_back():
    # 8 equal top values: the 0.5 cut removes some of them, which ones is the unstable sort's choice
    x = torch.zeros(1, 1, 64)
    x[..., :8] = 5.0
    called = []
    real = top_k_top_p_filter_reference_
    helpers.top_k_top_p_filter_reference_ = lambda *a: (called.append(1), real(*a))
    try:
        (fast_x, _), (ref_x, _) = _both(x, 8, 0.5)
    finally:
        helpers.top_k_top_p_filter_reference_ = real
    assert called == [1, 1] and torch.equal(fast_x, ref_x)


def test_fast_path_taken_on_ordinary_data(monkeypatch):
    # seed 1: no tie at the k-th value nor inside the cut (seed 0 has one tie at a row's cut: the fallback's case)
    x = torch.randn(4, 256, 4096, generator=torch.Generator().manual_seed(1))
    ref_x = x.clone()
    with fast_filter(False):
        top_k_top_p_filter_reference_(ref_x, 900, 0.96)

    def no_sort(*a, **kw):
        raise AssertionError('the fast path sorted all V')
    monkeypatch.setattr(torch.Tensor, 'sort', no_sort)
    assert helpers._top_k_top_p_filter_fast_(x, 900, 0.96) is True
    assert torch.equal(x, ref_x)


def test_other_paths_unchanged():
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    for k, p in [(0, 0.9), (10, 0.0), (0, 0.0)]:
        (fast_x, fast_idx), (ref_x, ref_idx) = _both(x, k, p)
        assert torch.equal(fast_x, ref_x) and torch.equal(fast_idx, ref_idx)
    for on in (True, False):   # top_k > V raises as the reference does
        with fast_filter(on), pytest.raises(RuntimeError):
            sample_with_top_k_top_p_(x.clone(), top_k=65, top_p=0.9)
    # per-sample generators
    outs = []
    for on in (True, False):
        with fast_filter(on):
            outs.append(sample_with_top_k_top_p_(x.clone(), top_k=10, top_p=0.9,
                                                 rng=[torch.Generator().manual_seed(s) for s in (1, 2)]))
    assert torch.equal(*outs)
