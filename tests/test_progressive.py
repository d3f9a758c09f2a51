"""Progressive training (--pg --pg0 --pgwp): the schedule object, its checkpoint state, and the stage-limited forward."""
import pytest
import torch

from conftest import TINY, TINY_TRAIN_FLAGS, build_tiny, reference_file
from utils.progressive import ProgressiveSchedule

PN = TINY['patch_nums']   # (1, 2, 3, 4): L = 1 + 4 + 9 + 16 = 30 tokens


def small_schedule(**kw) -> ProgressiveSchedule:
    # stage pg0 = 1 through the lr warm-up (g_it <= 2), then up to the last scale at g_it >= max_it·pg = 10
    return ProgressiveSchedule(**{**dict(patch_nums=PN, pg=0.5, pg0=1, wp_it=2, max_it=20, prog_wp_it=2), **kw})


def test_stages_and_warm_up_weights_of_a_small_schedule():
    s = small_schedule()
    # stage 1 + round((g - 2) / 8 · 2) between the warm-up and g = 10; round() halves to even at g = 4
    assert [s.stage(g) for g in range(12)] == [1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    got = [s.advance(g) for g in range(12)]
    # the first stage needs no warm-up (the lr warm-up covers it); each later stage's tokens start at
    # prog_it / prog_wp_it = 1/2; the last stage trains all scales (-1)
    assert got == [(1, 1), (1, 1), (1, 1), (1, 1), (1, 1), (2, 0.5), (2, 1), (2, 1), (-1, 0.5), (-1, 1), (-1, 1), (-1, 1)]
    assert s.state_dict() == {'prog_it': 4, 'last_prog_si': 3, 'first_prog': False}


def test_warm_up_weight_floor_and_the_schedule_off():
    s = small_schedule(prog_wp_it=150)
    weights = [s.advance(g)[1] for g in range(7)]
    assert weights[5:] == [0.01, pytest.approx(2 / 150)]   # 1/150 is floored at 0.01
    off = ProgressiveSchedule(PN)
    assert [off.advance(g) for g in range(5)] == [(-1, 1)] * 5
    assert off.state_dict() == {'prog_it': 5, 'last_prog_si': -1, 'first_prog': True}   # as the reference counts


def test_loss_weights_of_a_stage():
    s = small_schedule()
    torch.testing.assert_close(s.loss_weight_1L(-1, 0.3), torch.full((1, 30), 1 / 30), rtol=0, atol=0)   # all scales: no warm-up
    w = s.loss_weight_1L(2, 0.5)                       # scales 0..2: 1 + 4 + 9 tokens, the 9 of scale 2 at half weight
    assert w.shape == (1, 14)
    torch.testing.assert_close(w[0, :5], torch.full((5,), 1 / 30), rtol=0, atol=0)
    torch.testing.assert_close(w[0, 5:], torch.full((9,), 0.5 / 30), rtol=1e-7, atol=0)
    assert s.loss_weight_1L(0, 7.0).tolist() == [[pytest.approx(1 / 30)]]   # prog_wp clamped to [0, 1]


def test_state_round_trip_continues_the_same_sequence():
    a = small_schedule()
    for g in range(6):
        a.advance(g)
    b = small_schedule()
    b.load_state_dict({'patch_nums': PN, 'label_smooth': 0.1, **a.state_dict()})   # a trainer['config']: other keys ignored
    assert b.state_dict() == a.state_dict()
    assert [b.advance(g) for g in range(6, 12)] == [a.advance(g) for g in range(6, 12)]


def test_state_keys_are_the_reference_trainers():
    ck = torch.load(reference_file('ckpt_reference_tiny.pth'), map_location='cpu', weights_only=True)
    config = ck['trainer']['config']
    s = ProgressiveSchedule(tuple(config['patch_nums']))
    s.load_state_dict(config)
    assert set(s.state_dict()) == set(config) - {'patch_nums', 'resos', 'label_smooth'}
    assert s.state_dict() == {k: config[k] for k in s.state_dict()}


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match='pg0=4'):
        small_schedule(pg0=4)
    with pytest.raises(ValueError, match='pg=1'):
        small_schedule(pg=1)
    with pytest.raises(ValueError, match='max_it=0'):
        small_schedule(max_it=0)


def tokens_and_inputs(B=3, seed=0):
    """Token maps (B, pn²) of every scale and labels (B,), drawn at random."""
    g = torch.Generator().manual_seed(seed)
    idx_Bl = [torch.randint(0, TINY['V'], (B, pn * pn), generator=g) for pn in PN]
    return idx_Bl, torch.randint(0, TINY['num_classes'], (B,), generator=g)


@pytest.mark.parametrize('grouped', [True, False])
def test_forward_at_a_stage_is_the_full_forwards_prefix(grouped):
    vae, var = build_tiny(fast=grouped)   # converted: attention by groups of scales; plain: the dense mask
    var.cond_drop_rate = 0.0
    idx_Bl, label_B = tokens_and_inputs()
    x_full = vae.quantize.idxBl_to_var_input(idx_Bl)
    with torch.no_grad():
        full_BLV = var(label_B, x_full)
        assert torch.equal(full_BLV, var(label_B, x_full, prog_si=-1))
        for si, (_, ed) in enumerate(var.begin_ends):
            x = vae.quantize.idxBl_to_var_input(idx_Bl[:si + 1])   # the inputs of scales 1..si: a prefix of the full input
            if si == 0:
                assert x is None
                x = x_full[:, :0]
            else:
                assert torch.equal(x, x_full[:, :ed - var.first_l])
            logits_BLV = var(label_B, x, prog_si=si)
            assert logits_BLV.shape == (3, ed, TINY['V'])
            torch.testing.assert_close(logits_BLV, full_BLV[:, :ed], rtol=1e-5, atol=1e-5)


def test_forward_names_the_stage_when_the_input_does_not_fit():
    vae, var = build_tiny()
    idx_Bl, label_B = tokens_and_inputs()
    x = vae.quantize.idxBl_to_var_input(idx_Bl[:3])
    with pytest.raises(ValueError, match=r'expected \(3, 29, 8\) for prog_si=-1'):
        var(label_B, x)
    with pytest.raises(ValueError, match='prog_si=4'):
        var(label_B, x, prog_si=4)


def test_train_step_trains_the_stages_prefix_with_the_warm_up_weights():
    import torch.nn.functional as F
    from train import build_trainer
    from utils.arg_util import parse_args
    vae, var = build_tiny()
    args = parse_args(TINY_TRAIN_FLAGS + ['--afuse=0', '--ls=0', '--pg=0.5', '--pg0=1', '--ep=10', '--wp=1', '--pgwp=1'])
    trainer = build_trainer(args.finalize(world_size=1), torch.device('cpu'), vae, var, var, iters_train=2)
    assert trainer.progressive == small_schedule()   # the iteration counts: epochs × iters_train
    var.cond_drop_rate = 0.0
    g = torch.Generator().manual_seed(0)
    img, label = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.randint(0, 5, (2,), generator=g)
    idx_Bl = vae.img_to_idxBl(img)
    for g_it in range(5):   # token maps of all scales, cut to the stage's
        out = trainer.train_step(g_it, True, label, gt_idx_Bl=idx_Bl)
        assert (out['prog_si'], out['gt_BL'].shape[1]) == (1, 5)
    out = trainer.train_step(5, True, label, inp_B3HW=img)   # the first iteration of stage 2: its scale at half weight
    assert (out['prog_si'], out['prog_wp']) == (2, 0.5)
    assert out['logits_BLV'].shape[1] == out['gt_BL'].shape[1] == 14
    assert torch.equal(out['gt_BL'], torch.cat(idx_Bl[:3], dim=1))
    ce_BL = F.cross_entropy(out['logits_BLV'].transpose(1, 2), out['gt_BL'], reduction='none')
    want = (ce_BL[:, :5].sum(-1) + 0.5 * ce_BL[:, 5:].sum(-1)).mean() / 30
    assert out['loss'].item() == pytest.approx(want.item(), rel=1e-5)
    assert trainer.state_dict()['config']['prog_it'] == trainer.prog_it == 1
