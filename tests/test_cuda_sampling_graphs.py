"""utils/sampling_graphs.py on CUDA: the scale passes replayed as CUDA graphs give the tokens and images of the plain
pass for the same seed (float32 and float16 autocast, two successive calls, two batch sizes, editing hooks), a replayed
scale step makes no host synchronisation, and moved parameters get their graphs captured again. sample.py --cuda_graphs=1
writes the files of a run without it. The same logic without capturing: tests/test_sampling_graphs.py (CPU).
"""
import itertools

import numpy as np
import pytest
import torch

from cuda_util import CUDA_MARKS, DEVICE, tiny_on_cuda
from conftest import run_script
from models import make_edit_mask
from test_sample import sample_flags, tiny_ckpts  # noqa: F401 (tiny_ckpts is a fixture)
from utils.sampling_graphs import ScaleGraphs, use_cuda_graphs

pytestmark = CUDA_MARKS

SAMPLING = dict(cfg=2.0, top_k=20, top_p=0.9)


def sample(var, B, g_seed, amp=None, **kw):
    """(images, drawn tokens per scale) of one call, under inference mode as sample.py samples."""
    tokens = []
    with torch.inference_mode(), torch.autocast('cuda', dtype=amp or torch.float16, enabled=amp is not None):
        img = var.autoregressive_infer_cfg(B=B, label_B=None, g_seed=g_seed, **SAMPLING, **kw,
                                           on_scale=lambda si, logits_2BlV, idx_Bl: tokens.append(idx_Bl.clone()))
    return img, tokens


def assert_same(got, want, what=''):
    (img, tokens), (img_want, tokens_want) = got, want
    assert len(tokens) == len(tokens_want)
    for si, (idx, idx_want) in enumerate(zip(tokens, tokens_want)):
        assert torch.equal(idx, idx_want), f'{what}: tokens of scale {si} differ at {int((idx != idx_want).sum())} places'
    assert torch.equal(img, img_want), f'{what}: images differ'


def plain(var):
    """The model without its graphs (put back with use_cuda_graphs)."""
    return use_cuda_graphs(var, enabled=False)


@pytest.mark.parametrize('amp', [None, torch.float16], ids=['fp32', 'fp16_autocast'])
@pytest.mark.parametrize('overrides', [{}, dict(shared_aln=True, attn_l2_norm=True)], ids=['ada_lin', 'shared_aln_l2'])
def test_graphs_draw_the_plain_tokens(amp, overrides):
    """For batches 2 and 3 and two seeds: the plain pass, then two rounds with graphs (the first captures, the second
    only replays): the same tokens at every scale and the same images."""
    _, var = tiny_on_cuda(seed=0, **overrides)
    want = {(B, seed): sample(var, B, seed, amp) for B in (2, 3) for seed in (0, 1)}
    graphs = use_cuda_graphs(var).scale_logits
    assert isinstance(graphs, ScaleGraphs) and graphs.capture
    for round_ in range(2):
        for (B, seed), w in want.items():
            assert_same(sample(var, B, seed, amp), w, f'round {round_}, B={B}, seed {seed}')
    SN = len(var.patch_nums)
    assert graphs.sets_made == 2 and sorted(graphs.captured.values()) == [SN, SN]
    assert {key[0] for key in graphs.captured} == {4, 6}     # the doubled batches
    # without the on_scale hook the loop drops the raw logits early: the images are the same again
    with torch.inference_mode(), torch.autocast('cuda', dtype=amp or torch.float16, enabled=amp is not None):
        img = var.autoregressive_infer_cfg(B=3, label_B=None, g_seed=1, **SAMPLING)
    assert torch.equal(img, want[3, 1][0])


def test_graphs_with_editing_hooks():
    """Zero-shot editing (KeepInputTokens, the hooks path of edit.py), per-sample seeds: the plain pass's images."""
    vae, var = tiny_on_cuda(seed=1)
    with torch.inference_mode():
        input_idx = vae.img_to_idxBl(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 2 - 1)
    edit = dict(input_img_tokens=[t.expand(2, -1) for t in input_idx],
                edit_mask=make_edit_mask((0.25, 0.0, 0.75, 0.5), 'inpaint', (4, 4), device=DEVICE))
    want = sample(var, 2, [8, 9], **edit)
    use_cuda_graphs(var)
    assert_same(sample(var, 2, [8, 9], **edit), want, 'capturing call')
    assert_same(sample(var, 2, [8, 9], **edit), want, 'replaying call')


def test_a_replayed_scale_step_does_not_synchronise():
    """With every graph captured, each scale pass of a call runs under torch.cuda.set_sync_debug_mode('error')."""
    _, var = tiny_on_cuda(seed=2)
    graphs = use_cuda_graphs(var).scale_logits
    want = sample(var, 2, 0)   # captures
    torch.cuda.set_sync_debug_mode('error')
    try:
        with pytest.raises(RuntimeError):   # the mode is on: a synchronising call raises
            torch.zeros(1, device=DEVICE).item()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    passes = []

    def without_sync(var_, si, *args):
        torch.cuda.set_sync_debug_mode('error')
        try:
            return graphs(var_, si, *args)
        finally:
            torch.cuda.set_sync_debug_mode('default')
            passes.append(si)
    var.scale_logits = without_sync
    got = sample(var, 2, 0)
    assert passes == list(range(len(var.patch_nums)))
    assert graphs.sets_made == 1 and list(graphs.captured.values()) == [len(var.patch_nums)]
    assert_same(got, want, 'replaying call')


def test_moved_parameters_are_captured_again():
    """load_state_dict(..., assign=True) and .to() (the old tensors kept alive, so the new ones cannot take their
    addresses) give the model new parameter tensors: the graphs are captured again and draw the plain tokens; weights
    loaded in place are read by the graphs as they are."""
    _, var = tiny_on_cuda(seed=3)
    want = sample(var, 2, 0)
    graphs = use_cuda_graphs(var).scale_logits
    assert_same(sample(var, 2, 0), want, 'first capture')

    var.load_state_dict({k: v.clone() for k, v in var.state_dict().items()}, assign=True)
    assert_same(sample(var, 2, 0), want, 'after load_state_dict(assign=True)')
    assert graphs.sets_made == 2

    old = [t.detach() for t in itertools.chain(var.parameters(), var.buffers())]
    var.to('cpu').to(DEVICE)
    assert_same(sample(var, 2, 0), want, 'after .to()')
    assert graphs.sets_made == 3
    del old

    _, other = tiny_on_cuda(seed=4)
    var.load_state_dict(other.state_dict())   # copied into the same tensors: the graphs stay and read the new weights
    got = sample(var, 2, 0)
    assert graphs.sets_made == 3
    want_other = sample(plain(var), 2, 0)
    assert not torch.equal(want_other[0], want[0])
    assert_same(got, want_other, 'after an in-place load')


def test_sample_py_cuda_graphs_writes_the_same_files(tiny_ckpts, tmp_path):  # noqa: F811 (the fixture)
    """sample.py --cuda_graphs=1 on CUDA: batches of 4 and 2 (two sets of graphs), the npz of a run without graphs."""
    outs = {on: tmp_path / f'graphs_{on}' for on in (0, 1)}
    logs = {}
    for on, out in outs.items():
        res = run_script(sample_flags(tiny_ckpts, out, '--per_class=3', '--num_classes=2', '--bs=4', '--seed=1', f'--cuda_graphs={on}'))
        logs[on] = res.stdout + res.stderr
    assert 'CUDA graphs: on' in logs[1] and 'CUDA graphs' not in logs[0]
    arrs = {on: np.load(str(out) + '.npz')['arr_0'] for on, out in outs.items()}
    assert arrs[0].shape == (6, 64, 64, 3) and np.array_equal(arrs[0], arrs[1])
