"""utils.compile.compile_blocks: each transformer block compiled on its own (train.py --compile_blocks).

On the CPU the blocks are traced with torch.compile's 'aot_eager' backend: Dynamo's whole-graph capture (a graph break
is an error with fullgraph=True), its guards and recompiles, and AOTAutograd's joint forward and backward graph, all
as with inductor, without generating and building C++ code (minutes on a small CPU). Inductor's own numbers are
checked on CUDA (tests/test_cuda_compile.py).
"""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from conftest import TINY_TRAIN_FLAGS, build_tiny
from utils.arg_util import FlagError, parse_args
from utils.compile import compile_blocks, compiled_blocks, recompile_limit_for

BACKEND = 'aot_eager'


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from an empty cache and leaves torch._dynamo's limits as it found them."""
    config = torch._dynamo.config
    saved = config.recompile_limit, config.accumulated_recompile_limit
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    config.recompile_limit, config.accumulated_recompile_limit = saved


def unique_graphs() -> int:
    return counters['stats']['unique_graphs']


def no_drop_path(var):
    """Stochastic depth off: compiled and eager blocks draw their masks differently."""
    for b in var.blocks:
        if hasattr(b.drop_path, 'drop_prob'):
            b.drop_path.drop_prob = 0.0
    var.cond_drop_rate = 0.0
    return var


def inputs(var, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    label_B = torch.randint(0, var.num_classes, (B,), generator=g)
    x_BLCv = torch.randn(B, var.L - var.first_l, var.Cvae, generator=g)
    target_BL = torch.randint(0, var.V, (B, var.L), generator=g)
    return label_B, x_BLCv, target_BL


def logits_and_grads(var, label_B, x_BLCv, target_BL):
    var.zero_grad(set_to_none=True)
    logits_BLV = var(label_B, x_BLCv)
    F.cross_entropy(logits_BLV.reshape(-1, var.V), target_BL.reshape(-1)).backward()
    return logits_BLV.detach(), {n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def test_compiled_blocks_match_eager_teacher_forcing_and_gradients():
    _, var = build_tiny(attn_l2_norm=True)
    var = no_drop_path(var).train()
    batch = inputs(var)
    want_logits, want_grads = logits_and_grads(var, *batch)   # eager: the fast CPU paths
    assert compile_blocks(var, backend=BACKEND) is var and compiled_blocks(var) == 2
    got_logits, got_grads = logits_and_grads(var, *batch)     # compiled: PyTorch's plain ops, traced whole
    assert unique_graphs() == 2 and not counters['graph_break']   # block 0 (no drop path) and block 1
    assert rel_err(got_logits, want_logits) < 1e-5
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(list(var.parameters()))
    errors = {n: rel_err(got_grads[n], want_grads[n]) for n in want_grads}
    assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_no_recompiles_over_training_steps_and_one_graph_for_like_blocks():
    from train import build_trainer
    vae, var = build_tiny(depth=3)
    var.train()
    args = parse_args(TINY_TRAIN_FLAGS + ['--depth=3', '--afuse=0', '--bs=2']).finalize(world_size=1)
    compile_blocks(var, backend=BACKEND)
    trainer = build_trainer(args, torch.device('cpu'), vae, var, var, iters_train=3)
    g = torch.Generator().manual_seed(0)
    label_B, img_B3HW = torch.randint(0, 5, (2,), generator=g), torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    idx_Bl = vae.img_to_idxBl(img_B3HW)
    before = [p.detach().clone() for p in var.parameters()]
    losses = [trainer.train_step(0, True, label_B, gt_idx_Bl=idx_Bl)['loss'].item()]
    # three blocks, two structures: block 0 has no drop path; blocks 1 and 2 (other drop rates) share one graph
    assert unique_graphs() == 2 and not counters['graph_break']
    with torch._dynamo.config.patch(error_on_recompile=True):
        for g_it in (1, 2):
            losses.append(trainer.train_step(g_it, True, label_B, gt_idx_Bl=idx_Bl)['loss'].item())
    assert unique_graphs() == 2
    assert all(not torch.equal(p, q) for p, q in zip(var.parameters(), before) if p.requires_grad)   # the steps trained
    assert all(loss == loss for loss in losses)


def test_recompile_limit_covers_the_stages_and_is_never_lowered():
    _, var = build_tiny(depth=3)
    assert recompile_limit_for(var) == 2 * 4 * 4   # two block structures, four scales, (autograd or not) x two batch sizes
    torch._dynamo.config.recompile_limit = 100
    compile_blocks(var, backend=BACKEND)
    assert torch._dynamo.config.recompile_limit == 100
    torch._dynamo.config.recompile_limit = 8
    compile_blocks(var, backend=BACKEND)
    assert torch._dynamo.config.recompile_limit == 32


def test_every_stage_and_validation_compile_within_the_limit():
    _, var = build_tiny(depth=1)   # one block structure: one graph per shape and autograd mode
    var = no_drop_path(var).train()
    compile_blocks(var, backend=BACKEND)
    label_B, x_BLCv, _ = inputs(var, B=2)
    for prog_si in range(len(var.patch_nums)):   # the limit compile_blocks set: fullgraph=True would fail past it
        var(label_B, x_BLCv[:, :var.begin_ends[prog_si][1] - var.first_l], prog_si=prog_si).sum().backward()
    with torch.no_grad():
        var.eval()
        var(label_B[:1], x_BLCv[:1])
    assert unique_graphs() == 4 + 1 and not counters['graph_break']   # four stages (the last one is all scales), validation


def test_state_dict_keys_unchanged_and_checkpoints_load_both_ways(tmp_path):
    _, var = build_tiny()
    var = no_drop_path(var).train()
    keys = list(var.state_dict())
    compile_blocks(var, backend=BACKEND)
    batch = inputs(var)
    logits_and_grads(var, *batch)   # compiled
    assert list(var.state_dict()) == keys and not any('_orig_mod.' in k for k in keys)
    torch.save(var.state_dict(), tmp_path / 'compiled.pth')

    _, plain = build_tiny(seed=1)
    plain.load_state_dict(torch.load(tmp_path / 'compiled.pth', weights_only=True))   # strict, into a plain model
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), var.state_dict().values()))

    _, other = build_tiny(seed=2)
    other = no_drop_path(other).train()
    want_logits, _ = logits_and_grads(other, *batch)
    var.load_state_dict(other.state_dict())   # a plain model's weights into the compiled one: read by the same graphs
    got_logits, _ = logits_and_grads(var, *batch)
    assert unique_graphs() == 2 and rel_err(got_logits, want_logits) < 1e-5


def test_sampling_runs_the_blocks_eagerly_with_the_same_images():
    _, var = build_tiny()
    _, plain = build_tiny()
    compile_blocks(var, backend=BACKEND)
    with torch.no_grad():
        got = var.autoregressive_infer_cfg(2, [1, 3], g_seed=5, top_k=10)
        want = plain.autoregressive_infer_cfg(2, [1, 3], g_seed=5, top_k=10)
    assert torch.equal(got, want) and unique_graphs() == 0
    assert compiled_blocks(copy.deepcopy(var)) == 0   # a copy runs eagerly: the compiled functions are the original's


def test_compile_blocks_refuses_a_model_without_blocks():
    with pytest.raises(TypeError, match='compile_blocks takes a VAR'):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize('argv, message', [
    (['--compile_blocks=1', '--tfast=1'], '--compile_blocks=1 cannot be combined with --tfast=1'),
    (['--compile_blocks=1', '--tfast=3'], '--compile_blocks=1 cannot be combined with --tfast=3'),
    (['--compile_blocks=1', '--fsdp=1'], '--fsdp=1 does not support --compile_blocks=True: use --compile_blocks=0'),
])
def test_flag_combinations_refused(argv, message):
    with pytest.raises(FlagError) as e:
        parse_args(argv).finalize(1)
    assert message in str(e.value) and '\n' not in str(e.value)
    assert not parse_args(['--compile_blocks=1']).finalize(1).tfast   # alone it is fine


def test_train_py_refuses_compile_blocks_with_tfast_in_one_line(tmp_path):
    from conftest import run_script
    res = run_script(['train.py', '--compile_blocks=1', '--tfast=1', '--data_path=/nonexistent/data', '--vae_ckpt=/nonexistent/vae.pth',
                      f'--local_out_dir_path={tmp_path}'], check=False)
    assert res.returncode == 1, res.stderr[-2000:]
    assert 'error: --compile_blocks=1 cannot be combined with --tfast=1' in res.stderr and 'Traceback' not in res.stderr


def test_train_py_compiles_the_blocks_in_place_before_wrapping(tiny_vae_ckpt, tmp_path, caplog):
    from train import build_models
    args = parse_args(TINY_TRAIN_FLAGS + ['--compile_blocks=1', f'--vae_ckpt={tiny_vae_ckpt}', '--num_classes=5', '--seed=0',
                                          f'--local_out_dir_path={tmp_path}']).finalize(world_size=1)
    with caplog.at_level(logging.INFO):
        _, var_wo_ddp, var = build_models(args, torch.device('cpu'), None, 0)
    assert var is var_wo_ddp and compiled_blocks(var) == args.depth
    assert 'compiled 2 transformer blocks one by one' in caplog.text and 'compiled blocks attend by' in caplog.text


def test_drop_path_under_compile_reads_its_rate_from_a_tensor():
    from models.helpers import DropPath
    drop = DropPath(0.5).train()
    assert 'keep_prob' not in drop.state_dict() and drop.keep_prob.item() == 0.5
    drop.drop_prob = 0.25   # the tensor follows the rate
    assert drop.keep_prob.item() == 0.75
    x_BLC = torch.ones(4000, 1, 2)
    y_BLC = torch.compile(drop, fullgraph=True, dynamic=False, backend=BACKEND)(x_BLC)
    kept_B = y_BLC[:, 0, 0] != 0
    assert torch.equal(y_BLC[kept_B], torch.full_like(y_BLC[kept_B], 1 / 0.75)) and (y_BLC[~kept_B] == 0).all()
    assert abs(kept_B.float().mean().item() - 0.75) < 0.03   # 4000 draws: the standard error is 0.007
    assert torch.equal(torch.compile(drop.eval(), fullgraph=True, dynamic=False, backend=BACKEND)(x_BLC), x_BLC)
