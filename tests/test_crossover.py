"""Checkpoints cross over with the reference's trainer: its checkpoint resumes here, ours has the layout it resumes."""
import json
import shutil

import torch

from conftest import reference_file, run_script


def reference_ckpt_and_meta():
    ck = torch.load(reference_file('ckpt_reference_tiny.pth'), map_location='cpu', weights_only=True)
    meta = json.loads(reference_file('ckpt_reference_tiny.json').read_text())
    return ck, meta


def reference_flags(meta):
    b = meta['build']
    return [f'--depth={b["depth"]}', '--pn=' + '_'.join(map(str, b['patch_nums'])), f'--vocab_size={b["V"]}', f'--z_channels={b["Cvae"]}',
            f'--vae_ch={b["ch"]}', f'--share_quant_resi={b["share_quant_resi"]}', '--bs=4', '--tblr=1e-3', '--ls=0.1', '--tclip=2.']


def build_like_train_py(meta, *extra):
    from models import build_vae_var
    from train import build_trainer
    from utils.arg_util import parse_args
    b = meta['build']
    args = parse_args(reference_flags(meta) + ['--afuse=0', *extra]).finalize(world_size=1)
    vae, var = build_vae_var(device='cpu', V=b['V'], Cvae=b['Cvae'], ch=b['ch'], share_quant_resi=b['share_quant_resi'],
                             patch_nums=tuple(b['patch_nums']), num_classes=b['num_classes'], depth=b['depth'],
                             shared_aln=b['shared_aln'], attn_l2_norm=b['attn_l2_norm'], flash_if_available=False, fused_if_available=False)
    return build_trainer(args, torch.device('cpu'), vae, var, var), var


def test_parameter_groups_in_the_reference_order():
    _, meta = reference_ckpt_and_meta()
    trainer, var = build_like_train_py(meta)
    groups = trainer.var_opt.optimizer.param_groups
    assert [(g['wd_sc'], len(g['params'])) for g in groups] == [(g['wd_sc'], g['n_params']) for g in meta['param_groups']]
    name_of = {id(p): n for n, p in var.named_parameters()}
    index_to_name = [name_of[id(p)] for g in groups for p in g['params']]   # torch numbers the state in this order
    assert index_to_name == [meta['optimizer_state_index_to_parameter'][str(i)] for i in range(len(index_to_name))]


def test_reference_checkpoint_resumes_with_every_moment_on_its_parameter():
    from train import validate_ckpt
    ck, meta = reference_ckpt_and_meta()
    validate_ckpt(ck)   # completes the args the reference does not record, from the state dicts
    b = meta['build']
    assert {k: ck['args'][k] for k in ('num_classes', 'vocab_size', 'z_channels', 'vae_ch', 'share_quant_resi', 'world_size')} == dict(
        num_classes=b['num_classes'], vocab_size=b['V'], z_channels=b['Cvae'], vae_ch=b['ch'], share_quant_resi=b['share_quant_resi'], world_size=1)
    trainer, var = build_like_train_py(meta)
    trainer.load_state_dict(ck['trainer'], strict=True, skip_vae=True)
    saved = ck['trainer']['var_opt']['optimizer']['state']
    params = dict(var.named_parameters())
    state = trainer.var_opt.optimizer.state
    for i, name in meta['optimizer_state_index_to_parameter'].items():
        p = params[name]
        for k in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(state[p][k], saved[int(i)][k]), (name, k)
        assert state[p]['exp_avg'].shape == p.shape
    assert trainer.prog_it == ck['trainer']['config']['prog_it']


def test_a_checkpoint_of_the_older_decay_first_layout_is_renumbered():
    """Checkpoints this project wrote before it followed the reference's group order still resume with the moments in place."""
    from utils.lr_control import filter_params
    _, meta = reference_ckpt_and_meta()
    old_trainer, old_var = build_like_train_py(meta)
    _, _, groups = filter_params(old_var)
    old_opt = torch.optim.AdamW(groups[::-1], lr=1e-3, betas=(0.9, 0.95))   # [decay, no-decay]
    for p in old_var.parameters():
        p.grad = torch.randn_like(p)
    old_opt.step()
    old_trainer.var_opt.optimizer = old_opt
    sd = old_trainer.state_dict()
    new_trainer, new_var = build_like_train_py(meta)
    new_trainer.load_state_dict(sd, strict=True)
    new_state = new_trainer.var_opt.optimizer.state
    for (n, p_old), p_new in zip(old_var.named_parameters(), new_var.parameters()):
        assert torch.equal(old_opt.state[p_old]['exp_avg'], new_state[p_new]['exp_avg']), n


def test_reference_checkpoint_resumes_in_train_py_and_ours_has_the_reference_layout(tiny_shapes, tmp_path):
    ck, meta = reference_ckpt_and_meta()
    out = tmp_path / 'run'
    out.mkdir()
    shutil.copy(reference_file('ckpt_reference_tiny.pth'), out / 'ar-ckpt-last.pth')
    vae_path = tmp_path / 'tokenizer.pth'
    torch.save(ck['trainer']['vae_local'], vae_path)
    res = run_script(['train.py', f'--data_path={tiny_shapes}', f'--vae_ckpt={vae_path}', f'--local_out_dir_path={out}',
                      *reference_flags(meta), '--ep=2', '--workers=0'])
    log = res.stdout + res.stderr
    assert log.count("a checkpoint of the reference's train.py") == 1, log[-3000:]
    assert 'num_classes=10 (from class_emb.weight' in log and 'vocab_size=512' in log and 'vae_ch=32' in log
    assert 'resuming from' in log and 'at epoch 1, iteration 0' in log

    ours = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ours['epoch'], ours['iter']) == (2, 0)
    # everything the reference's train.py and VARTrainer.load_state_dict read, in the same layout
    assert set(ours) >= set(ck) and set(ours['trainer']) >= set(ck['trainer'])
    assert ours['trainer']['config'].keys() == ck['trainer']['config'].keys()
    assert tuple(ours['trainer']['config']['patch_nums']) == tuple(ck['trainer']['config']['patch_nums'])
    assert set(ours['trainer']['var_opt']) == set(ck['trainer']['var_opt']) == {'optimizer'}   # --fp16=0: no scaler
    for k in ('var_wo_ddp', 'vae_local'):
        assert {n: v.shape for n, v in ours['trainer'][k].items()} == {n: v.shape for n, v in ck['trainer'][k].items()}, k
    o, r = ours['trainer']['var_opt']['optimizer'], ck['trainer']['var_opt']['optimizer']
    assert [(g['wd_sc'], g['lr_sc'], g['params']) for g in o['param_groups']] == [(g['wd_sc'], g['lr_sc'], g['params']) for g in r['param_groups']]
    assert {i: s['exp_avg'].shape for i, s in o['state'].items()} == {i: s['exp_avg'].shape for i, s in r['state'].items()}
    assert all(s['step'].item() > r['state'][i]['step'].item() for i, s in o['state'].items())   # it trained on
