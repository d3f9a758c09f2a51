"""Linear layers through oneDNN on the CPU: the numbers and gradients of F.linear, used exactly where they apply."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from conftest import build_tiny
from cpu_kernels import fast_paths, fast_paths_enabled, set_fast_paths
from cpu_kernels.matmul import Linear, linear, onednn_available

pytestmark = [pytest.mark.skipif(not onednn_available(), reason='this PyTorch build has no oneDNN for this CPU'),
              pytest.mark.usefixtures('cpu_with_fast_kernels')]   # the kernels as the AMD rule chooses them


def onednn_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == 'mkldnn::_linear_pointwise')


def test_forward_and_gradients_equal_f_linear():
    torch.manual_seed(0)
    x = torch.randn(3, 17, 64, requires_grad=True)
    w = (torch.randn(96, 64) * 0.1).requires_grad_()
    b = torch.randn(96, requires_grad=True)
    g = torch.randn(3, 17, 96)
    for bias, gelu in ((b, False), (None, False), (b, True)):
        def run(onednn):
            with fast_paths(onednn):
                y = linear(x, w, bias, act='gelu_tanh' if gelu else None)
            grads = torch.autograd.grad(y, [x, w] + ([bias] if bias is not None else []), g)
            return y, grads
        assert onednn_calls(lambda: run(True)) == 3      # the forward, the input and the weight gradient
        (y, grads), (y_ref, grads_ref) = run(True), run(False)
        assert y.shape == (3, 17, 96)
        assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(grads, grads_ref):
            assert torch.allclose(a, r, rtol=1e-4, atol=1e-4)


def test_inference_fuses_the_gelu_and_matches():
    torch.manual_seed(0)
    x, w, b = torch.randn(40, 64), torch.randn(256, 64) * 0.1, torch.randn(256)
    with torch.no_grad():
        assert onednn_calls(lambda: linear(x, w, b, act='gelu_tanh')) == 1
        got = linear(x, w, b, act='gelu_tanh')
    assert torch.allclose(got, F.gelu(F.linear(x, w, b), approximate='tanh'), rtol=1e-5, atol=1e-5)


def test_falls_back_to_f_linear_where_onednn_does_not_apply():
    torch.manual_seed(0)
    lin = Linear(32, 48)
    assert set(lin.state_dict()) == {'weight', 'bias'}   # checkpoint keys of nn.Linear
    x = torch.randn(5, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert onednn_calls(lambda: lin(x)) == 0 and lin(x).dtype == torch.bfloat16   # autocast keeps F.linear
    assert onednn_calls(lambda: lin(x)) == 1
    with fast_paths(False):
        assert onednn_calls(lambda: lin(x)) == 0 and torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_var_switches_onednn_with_its_fast_paths():
    _, var = build_tiny(fast=True)
    var.eval()
    label_B = torch.tensor([1, 2])
    x = torch.randn(2, var.L - var.first_l, var.Cvae)
    with torch.no_grad():
        assert onednn_calls(lambda: var(label_B, x)) > 0
        fast = var(label_B, x)
        set_fast_paths(False)
        assert not fast_paths_enabled()
        assert onednn_calls(lambda: var(label_B, x)) == 0
        plain = var(label_B, x)
    assert (fast - plain).abs().max() < 1e-4


def test_torch_compile_of_var_traces_f_linear_with_the_same_numbers():
    """--tfast: torch.compile cannot lower oneDNN's linear with a trainable weight; under tracing F.linear is used."""
    _, var = build_tiny(fast=True)
    var.eval()
    var.cond_drop_rate = 0
    label_B, x = torch.tensor([1, 2]), torch.randn(2, var.L - var.first_l, var.Cvae)
    eager = var(label_B, x)
    eager.sum().backward()
    grad_eager = var.head.weight.grad.clone()
    var.zero_grad()
    compiled = torch.compile(var)(label_B, x)
    compiled.sum().backward()
    assert torch.allclose(compiled, eager, atol=1e-4)
    assert torch.allclose(var.head.weight.grad, grad_eager, rtol=1e-4, atol=1e-4)
