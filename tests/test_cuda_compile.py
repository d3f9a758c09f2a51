"""utils.compile.compile_blocks on CUDA with inductor: the compiled blocks against the eager ones.

- float32 with TensorFloat32 off: logits and every parameter's gradient (after a cross-entropy backward) within 1e-5
  of their largest value; the compiled blocks run PyTorch's plain ops (FlexAttention where models.attention has it)
  where the eager ones run SDPA with the dense mask, so what differs is float rounding of fused kernels;
- bfloat16 autocast: the loss within 1e-2 relative;
- three training steps with an AdamW step between compile nothing after the first (error_on_recompile), and the
  blocks' graphs have no break (fullgraph=True would have raised).
"""
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from cuda_util import CUDA_MARKS, DEVICE, ieee_fp32, max_rel_err, tiny_on_cuda
from test_compile import fresh_dynamo  # noqa: F401  (autouse: every test compiles from an empty cache)
from models import attention as attention_backends
from utils.compile import compile_blocks

pytestmark = CUDA_MARKS

B = 4


def tiny_for_training(seed: int = 0):
    """The tiny VAR on CUDA in training mode, stochastic depth and condition dropout off (they draw differently compiled)."""
    _, var = tiny_on_cuda(seed=seed)
    for b in var.blocks:
        if hasattr(b.drop_path, 'drop_prob'):
            b.drop_path.drop_prob = 0.0
    var.cond_drop_rate = 0.0
    return var.train()


def batch(var, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    label_B = torch.randint(0, var.num_classes, (B,), generator=g)
    x_BLCv = torch.randn(B, var.L - var.first_l, var.Cvae, generator=g)
    target_BL = torch.randint(0, var.V, (B, var.L), generator=g)
    return label_B.to(DEVICE), x_BLCv.to(DEVICE), target_BL.to(DEVICE)


def loss_of(var, label_B, x_BLCv, target_BL) -> torch.Tensor:
    logits_BLV = var(label_B, x_BLCv)
    return F.cross_entropy(logits_BLV.reshape(-1, var.V).float(), target_BL.reshape(-1)), logits_BLV


def logits_and_grads(var, *inputs):
    var.zero_grad(set_to_none=True)
    loss, logits_BLV = loss_of(var, *inputs)
    loss.backward()
    return logits_BLV.detach(), {n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None}


def expected_backend() -> str:
    return 'flex' if 'flex' in attention_backends.BACKENDS and attention_backends.backend_status('flex')[0] else 'sdpa'


def test_compiled_blocks_match_eager_in_float32_and_train_without_recompiles():
    with ieee_fp32():
        var = tiny_for_training()
        inputs = batch(var)
        want_logits, want_grads = logits_and_grads(var, *inputs)
        compile_blocks(var)
        assert var.attn_backend == expected_backend()
        got_logits, got_grads = logits_and_grads(var, *inputs)
        assert counters['stats']['unique_graphs'] == 2 and not counters['graph_break']
        assert max_rel_err(got_logits, want_logits, floor=0) < 1e-5
        assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(list(var.parameters()))
        errors = {n: max_rel_err(got_grads[n], want_grads[n], floor=0) for n in want_grads}
        assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]

        opt = torch.optim.AdamW(var.parameters(), lr=1e-3)
        losses = []
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed in range(3):
                opt.zero_grad(set_to_none=True)
                loss, _ = loss_of(var, *batch(var, seed))
                loss.backward()
                opt.step()
                losses.append(loss.item())
        assert counters['stats']['unique_graphs'] == 2 and all(loss == loss for loss in losses)


def test_compiled_blocks_bf16_autocast_loss_is_close_to_eager():
    var = tiny_for_training()
    inputs = batch(var)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        want, _ = loss_of(var, *inputs)
    compile_blocks(var)
    with torch.autocast('cuda', dtype=torch.bfloat16):   # with autograd, as in training
        got, _ = loss_of(var, *inputs)
    got.backward()
    assert not counters['graph_break']
    assert abs(got.item() - want.item()) <= 1e-2 * abs(want.item()), (got.item(), want.item())
    assert all(torch.isfinite(p.grad).all() for p in var.parameters() if p.grad is not None)
