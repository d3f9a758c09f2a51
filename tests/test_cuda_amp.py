"""Mixed precision and the optimizer on CUDA, through the trainer's own VARTrainer and AmpOptimizer.

- One training step under --fp16=1 (float16 autocast, loss scaler) and --fp16=2 (bfloat16 autocast) gives the
  float32 loss within 5e-4 (float16) / 2e-3 (bfloat16) relative, and gradients within 1e-2 / 4e-2 of the
  float32 gradient's norm (all parameters together, float16's unscaled); float32 has TF32 off. The tiny model
  shows 2e-5 / 1e-4 (loss) and 9e-4 / 7e-3 (gradients) under CPU autocast: the bounds leave 6-25x for other
  kernels; an unscaled or wrongly scaled gradient, or a term computed in the wrong precision, is off by far more.
- The float16 loss scaler skips a step whose gradient overflowed and lowers its scale as the reference's
  AmpOptimizer does (utils/amp_sc.py of FoundationVision/VAR: torch's GradScaler, initial scale 2^11, halved
  on an overflow, and set to 2^15 when the scale used was above 2^15); with the fused AdamW train.py uses.
- Fused AdamW (train.py's --afuse=1) equals the unfused one to float32 rounding: after three steps of lr 1e-3
  (which move weights by about 3e-3) within a few ulps (rtol 2e-6, atol 1e-6; the CPU shows 4e-7).
"""
import math

import pytest
import torch

from conftest import TINY
from cuda_util import CUDA_MARKS, DEVICE, ieee_fp32, tiny_on_cuda
from trainer import VARTrainer
from utils.amp_opt import AmpOptimizer, build_adamw
from utils.lr_control import filter_params

pytestmark = CUDA_MARKS

LOSS_TOL = {1: 5e-4, 2: 2e-3}
GRAD_TOL = {1: 1e-2, 2: 4e-2}
B = 4


def make_trainer(mixed_precision: int, fused: bool = True, grad_clip: float = 2.0, seed: int = 0):
    vae, var = tiny_on_cuda(seed=seed)
    var.cond_drop_rate = 0.0
    names, paras, groups = filter_params(var)
    opt = build_adamw(groups, lr=1e-3, fused=fused)
    var_opt = AmpOptimizer(DEVICE.type, mixed_precision, opt, names, paras, grad_clip=grad_clip)
    patch_nums = TINY['patch_nums']
    return VARTrainer(device=DEVICE, patch_nums=patch_nums, resos=[pn * 16 for pn in patch_nums], vae_local=vae, var_wo_ddp=var,
                      var=var, var_opt=var_opt, label_smooth=0.1)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gt_idx_Bl = [torch.randint(0, TINY['V'], (B, pn * pn), generator=g).to(DEVICE) for pn in TINY['patch_nums']]
    label_B = torch.randint(0, TINY['num_classes'], (B,), generator=g).to(DEVICE)
    return label_B, gt_idx_Bl


def step(trainer: VARTrainer, stepping: bool, seed: int = 0):
    label_B, gt_idx_Bl = batch(seed)
    return trainer.train_step(g_it=0, stepping=stepping, label_B=label_B, gt_idx_Bl=gt_idx_Bl)


def unscaled_grads(trainer: VARTrainer) -> torch.Tensor:
    scaler = trainer.var_opt.scaler
    scale = scaler.get_scale() if scaler is not None else 1.0
    return torch.cat([p.grad.double().flatten() / scale for p in trainer.var_opt.paras])


def params_of(trainer: VARTrainer):
    return [p.detach().clone() for p in trainer.var_opt.paras]


@pytest.mark.parametrize('fp16', [1, 2])
def test_mixed_precision_step_is_close_to_float32(fp16):
    with ieee_fp32():
        ref = make_trainer(0)
        out32 = step(ref, stepping=False)   # backward only: the gradients stay in .grad
        g32 = unscaled_grads(ref)
    amp = make_trainer(fp16)
    out = step(amp, stepping=False)
    g = unscaled_grads(amp)
    assert amp.var_opt.amp_dtype == (torch.float16 if fp16 == 1 else torch.bfloat16)
    assert (amp.var_opt.scaler is not None) == (fp16 == 1)
    loss_err = abs(out['loss'].item() - out32['loss'].item()) / out32['loss'].item()
    assert loss_err <= LOSS_TOL[fp16], f'--fp16={fp16}: loss {out["loss"].item():.6f} vs float32 {out32["loss"].item():.6f}'
    assert torch.isfinite(g).all(), f'--fp16={fp16}: non-finite gradients'
    grad_err = ((g - g32).norm() / g32.norm()).item()
    assert grad_err <= GRAD_TOL[fp16], f'--fp16={fp16}: gradients differ from float32 by {grad_err:.3g} of their norm'
    # and the optimizer step then goes through: finite norm, not skipped, the parameters move
    amp.var_opt.optimizer.zero_grad(set_to_none=True)
    before = params_of(amp)
    res = step(amp, stepping=True)
    assert not res['skipped'] and math.isfinite(res['grad_norm'])
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(amp)))
    if fp16 == 1:
        assert res['scale_log2'] == 11


def overflow_on_next_backward(trainer: VARTrainer):
    """A hook that makes the head's weight gradient infinite once, as a float16 overflow would."""
    w = trainer.var_wo_ddp.head.weight

    def hook(grad):
        handle.remove()
        return torch.full_like(grad, float('inf'))
    handle = w.register_hook(hook)


def test_fp16_scaler_skips_an_overflowing_step_and_lowers_its_scale_like_the_reference():
    trainer = make_trainer(1, fused=True)
    opt, scaler = trainer.var_opt.optimizer, trainer.var_opt.scaler
    assert opt.defaults.get('fused'), 'train.py asks for fused AdamW (--afuse=1); on CUDA it must be there'
    assert scaler.get_scale() == 2.0 ** 11                       # the reference's initial scale
    # an injected overflow: the step is skipped, nothing moves, the scale halves (2^11 -> 2^10)
    before = params_of(trainer)
    overflow_on_next_backward(trainer)
    res = step(trainer, stepping=True)
    assert res['skipped'] and not math.isfinite(res['grad_norm'])
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(trainer))), 'a skipped step must not change the weights'
    assert all(float(s['step']) == 0 for s in opt.state.values()), 'a skipped step must not advance AdamW'
    assert scaler.get_scale() == 2.0 ** 10 and res['scale_log2'] == 11   # logged: the scale the step used, as the reference logs it
    # a clean step: taken, the scale stays (it grows only after 1000 clean steps in a row)
    res = step(trainer, stepping=True, seed=1)
    assert not res['skipped'] and all(float(s['step']) == 1 for s in opt.state.values())
    assert not all(torch.equal(a, b) for a, b in zip(before, params_of(trainer)))
    assert scaler.get_scale() == 2.0 ** 10
    # two overflows in a row: halved twice
    for _ in range(2):
        overflow_on_next_backward(trainer)
        assert step(trainer, stepping=True)['skipped']
    assert scaler.get_scale() == 2.0 ** 8 and all(float(s['step']) == 1 for s in opt.state.values())
    # a real float16 overflow (a scale of 2^40 takes the scaled gradients past 65504): skipped, and the scale comes
    # back to 2^15, where the reference puts it after using a scale above 2^15
    scaler.update(new_scale=2.0 ** 40)
    before = params_of(trainer)
    res = step(trainer, stepping=True, seed=2)
    assert res['skipped']
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(trainer)))
    assert scaler.get_scale() == 2.0 ** 15 and res['scale_log2'] == 40   # logged: the scale the step used


def test_fused_adamw_equals_the_unfused_one():
    with ieee_fp32():
        fused, plain = make_trainer(0, fused=True), make_trainer(0, fused=False)
        assert fused.var_opt.optimizer.defaults.get('fused') and not plain.var_opt.optimizer.defaults.get('fused')
        for it in range(3):
            for t in (fused, plain):
                res = step(t, stepping=True, seed=it)
                assert not res['skipped']
        worst = max(((a - b).abs() - 2e-6 * b.abs()).max().item() for a, b in zip(params_of(fused), params_of(plain)))
        moved = max((a - b).abs().max().item() for a, b in zip(params_of(fused), params_of(make_trainer(0))))
    assert moved > 1e-3, 'the three steps must move the weights'
    assert worst <= 1e-6, f'fused and unfused AdamW differ by {worst:.3g} beyond rtol 2e-6 after three steps (lr 1e-3)'
