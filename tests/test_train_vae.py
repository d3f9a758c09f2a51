"""train_vae.py: the loss falls, checkpoints round-trip into train.py, evaluation, perceptual-loss weights, resume after SIGKILL."""
import json

import pytest
import torch

from conftest import REPO, TINY_TRAIN_FLAGS, run_and_kill_after_checkpoint, run_script
from test_vae_parts import fake_lpips_weights

TINY_VAE_FLAGS = ['--vocab_size=64', '--z_channels=8', '--vae_ch=32', '--pn=1_2_3_4']


def vae_flags(data, out, *extra):
    return ['train_vae.py', f'--data_path={data}', f'--local_out_dir_path={out}', *TINY_VAE_FLAGS, *extra]


def test_a_few_steps_lower_the_reconstruction_loss(shapes_data):
    from models import VQVAE
    from utils.amp_opt import AmpOptimizer, build_adamw
    from utils.data import build_dataset
    from utils.lr_control import filter_params
    from vae_trainer import VQVAETrainer
    torch.manual_seed(0)
    _, train_set, _, _ = build_dataset(str(shapes_data), final_reso=64, mid_reso=1.0)
    x = torch.stack([train_set[i][0] for i in range(0, len(train_set), len(train_set) // 8)][:8])
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 3, 4), test_mode=False)
    names, paras, groups = filter_params(vae)
    opt = AmpOptimizer('cpu', 0, build_adamw(groups, lr=2e-3, fused=False), names, paras, grad_clip=0)
    trainer = VQVAETrainer(torch.device('cpu'), vae, vae, opt)

    def rec_l1():
        vae.eval()
        with torch.no_grad():
            err = (vae.img_to_reconstructed_img(x, last_one=True) - x).abs().mean().item()
        vae.train()
        return err

    before = rec_l1()
    losses = [trainer.train_step(g_it, True, x)['rec_loss'].item() for g_it in range(25)]
    after = rec_l1()
    assert after < before - 0.05, (before, after)
    assert losses[-1] < losses[0]


def test_checkpoint_round_trips_into_train_py_and_eval_only(tiny_shapes, tmp_path):
    out = tmp_path / 'vae'
    run_script(vae_flags(tiny_shapes, out, '--bs=4', '--ep=2', '--lr=1e-3', '--lpips_weight=0', '--disc_start=3', '--disc_ch=16',
                         '--reinit_dead=2', '--dead_threshold=0.5', '--seed=0'), torchrun_procs=2)
    for name in ('vae.pth', 'vae-ckpt-last.pth', 'vae-ckpt-best.pth', 'log.txt', 'stdout.txt'):
        assert (out / name).is_file(), name
    log = [json.loads(x) for x in (out / 'log.txt').read_text().splitlines()]
    evals = [r for r in log if r.get('eval')]
    assert len(evals) == 2 and all(k in evals[-1] for k in ('psnr', 'ssim', 'usage_1', 'usage_4', 'l1')) and evals[-1]['images'] == 6
    assert 0 < evals[-1]['ssim'] <= 1 and evals[-1]['psnr'] > 5
    assert log[-1]['reinitialised'] > 0
    stdout = (out / 'stdout.txt').read_text()
    assert 're-initialised' in stdout and 'adversarial from iteration 3' in stdout and 'rank 0 of 2, backend gloo' in stdout
    from test_train import read_scalars
    sc = read_scalars(out)
    assert {'VAE_iter_loss/rec_loss', 'VAE_iter_loss/vq_loss', 'VAE_iter_loss/d_loss', 'VAE_iter_loss/g_loss',
            'VAE_codebook_usage/scale_4', 'VAE_val/psnr', 'VAE_val/ssim', 'VAE_val/usage_1'} <= set(sc)
    ck = torch.load(out / 'vae-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert {'vae_wo_ddp', 'vae_opt', 'disc', 'disc_opt'} <= set(ck['trainer']) and ck['epoch'] == 2
    assert ck['class_names'] == sorted(p.name for p in (tiny_shapes / 'train').iterdir())   # id = position of the class folder

    # the exported weights load strictly into build_vae_var ...
    from models import build_vae_var
    vae, _ = build_vae_var(device='cpu', V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=6, depth=2)
    vae.load_state_dict(torch.load(out / 'vae.pth', map_location='cpu', weights_only=True), strict=True)
    # ... and both files work as train.py --vae_ckpt
    for i, src in enumerate(('vae.pth', 'vae-ckpt-last.pth')):
        res = run_script(['train.py', f'--data_path={tiny_shapes}', f'--vae_ckpt={out / src}', f'--local_out_dir_path={tmp_path / f"var{i}"}',
                          *TINY_TRAIN_FLAGS, '--bs=8', '--ep=1'])
        assert f'tokenizer weights: --vae_ckpt={out / src}' in res.stdout

    res = run_script(vae_flags(tiny_shapes, tmp_path / 'eval', '--eval_only=1', f'--vae_ckpt={out / "vae.pth"}'))
    assert 'eval: PSNR' in res.stdout and 'codebook usage 1:' in res.stdout
    line = json.loads((tmp_path / 'eval' / 'log.txt').read_text().splitlines()[-1])
    assert line['eval_only'] and line['psnr'] == pytest.approx(evals[-1]['psnr'], abs=0.05)


def test_perceptual_loss_weights_local_or_a_clear_stop(tiny_shapes, tmp_path):
    from test_evaluate import offline_env   # downloads go to an unreachable local proxy: the same result on- or offline
    res = run_script([str(REPO / 'train_vae.py'), f'--data_path={tiny_shapes}', f'--local_out_dir_path={tmp_path / "a"}', *TINY_VAE_FLAGS,
                      '--ep=1', '--bs=8'], check=False, env=offline_env(tmp_path), cwd=tmp_path)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert 'vgg16-397923af.pth' in res.stderr and '--lpips_weight=0' in res.stderr
    assert 'URLError' in res.stderr and 'Connection refused' in res.stderr   # the download went to the local proxy, and failed
    assert not list((tmp_path / 'torch_home').rglob('*.pth'))
    vgg, lin = fake_lpips_weights(tmp_path)
    res = run_script(vae_flags(tiny_shapes, tmp_path / 'b', '--ep=1', '--bs=8', f'--lpips_vgg={vgg}', f'--lpips_lin={lin}', '--disc_start=-1'))
    assert 'losses: l1 + lpips' in res.stdout
    from test_train import read_scalars
    assert 'VAE_iter_loss/lpips' in read_scalars(tmp_path / 'b')


def test_sigkill_and_resume_gives_the_same_tokenizer(tiny_shapes, tmp_path):
    flags = ['--bs=4', '--ep=3', '--lr=1e-3', '--ckpt_every_it=2', '--seed=3', '--lpips_weight=0', '--disc_start=4', '--disc_ch=16',
             '--reinit_dead=3', '--dead_threshold=0.5', '--hflip=1']
    run_script(vae_flags(tiny_shapes, tmp_path / 'ref', *flags))
    out = tmp_path / 'killed'
    # 6 iterations per epoch, a checkpoint every 2: the process kills itself right after the one at iteration 8
    run_and_kill_after_checkpoint(vae_flags(tiny_shapes, out, *flags), out / 'vae-ckpt-last.pth', kill_at_iter=7)
    at_kill = torch.load(out / 'vae-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (at_kill['epoch'], at_kill['iter']) == (1, 2), 'the kill must land mid-epoch, after the checkpoint at iteration 8'
    res = run_script(vae_flags(tiny_shapes, out, *flags))
    assert 'resuming from' in res.stdout and 'vae-ckpt-last.pth at epoch 1, iteration 2' in res.stdout, 'a mid-epoch resume'
    a = torch.load(tmp_path / 'ref' / 'vae-ckpt-last.pth', map_location='cpu', weights_only=True)['trainer']
    b = torch.load(out / 'vae-ckpt-last.pth', map_location='cpu', weights_only=True)['trainer']
    for part in ('vae_wo_ddp', 'disc'):
        diff = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not diff, f'{part} differs after the resume: {diff[:5]}'
