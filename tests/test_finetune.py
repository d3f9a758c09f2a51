"""train.py --init_from: fine-tuning from a published-layout state dict, a save_pretrained folder or a train.py checkpoint,
as real train.py processes reading real files; the weights after the load compared tensor by tensor."""
import json
import re

import pytest
import torch

from conftest import REPO, TINY, TINY_TRAIN_FLAGS, build_tiny, reference_file, run_and_kill_after_checkpoint, run_script, script_env

# the scales are the one shape flag a state dict does not record; the tokenizer's width is --vae_ckpt's, not the VAR's
STATE_DICT_FLAGS = ['--pn=1_2_3_4', '--vae_ch=32']
# lr 0 at the first iteration (linear warm-up from wp0=0 over one epoch): the checkpoint written after it holds the loaded weights
FIRST_STEP_AT_LR_0 = ['--bs=8', '--ep=1', '--wp=1', '--wp0=0', '--ckpt_every_it=1', '--seed=4', '--vis_every_ep=-1',
                      '--save_pretrained=0']


def finetune_flags(data, out, init_from, *extra):
    return ['train.py', f'--data_path={data}', f'--local_out_dir_path={out}', f'--init_from={init_from}', *extra]


def after_first_step(argv, out):
    """Run train.py until it has written the checkpoint of its first iteration (lr 0); that checkpoint and the run's log."""
    run_and_kill_after_checkpoint(argv, out / 'ar-ckpt-last.pth', kill_at_iter=1)
    return torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True), (out / 'stdout.txt').read_text()


def fresh_class_rows(seed, num_classes, **build):
    """The class embedding train.py builds before loading any weights (torch.manual_seed(seed), then the tokenizer, then VAR)."""
    from models import build_vae_var
    kw = {**dict(V=TINY['V'], Cvae=TINY['Cvae'], ch=TINY['ch'], patch_nums=TINY['patch_nums'], depth=TINY['depth']), **build}
    torch.manual_seed(seed)
    _, var = build_vae_var(device='cpu', num_classes=num_classes, **kw)
    return var.class_emb.weight.detach()


def assert_equal_but_class_emb(loaded, source):
    assert loaded.keys() == source.keys()
    differ = [k for k in source if k != 'class_emb.weight' and not torch.equal(loaded[k], source[k])]
    assert not differ, f'tensors that did not load as they are: {differ[:5]}'


def class_lines(log):
    return [line for line in log.splitlines() if 'class embedding:' in line]


@pytest.fixture(scope='module')
def published_layout(tmp_path_factory):
    """A tiny VAR (6 classes) saved as the published files are: torch.save of its state dict, the published keys."""
    _, var = build_tiny(seed=5, num_classes=6)
    path = tmp_path_factory.mktemp('published') / 'tiny_var.pth'
    torch.save(var.state_dict(), path)
    return path, var.state_dict()


@pytest.fixture(scope='module')
def pretrained_run(shapes_data, tiny_vae_ckpt, tmp_path_factory):
    """Three epochs from scratch on the 6 shape classes, with EMA: the weights a fine-tuning run starts from."""
    out = tmp_path_factory.mktemp('pretrained')
    run_script(['train.py', f'--data_path={shapes_data}', f'--vae_ckpt={tiny_vae_ckpt}', f'--local_out_dir_path={out}', *TINY_TRAIN_FLAGS,
                '--bs=8', '--ep=3', '--fixed_tlr=3e-3', '--ema=0.9', '--seed=3', '--vis_every_ep=-1', '--save_pretrained=0'])
    return out


@pytest.fixture(scope='module')
def four_of_the_classes(tmp_path_factory):
    """Few-class data: 4 of the 6 classes of shapes_data (other pictures of them)."""
    from utils.toy_data import make_shapes_dataset
    root = tmp_path_factory.mktemp('four')
    make_shapes_dataset(str(root), train_per_class=8, val_per_class=2, size=64, n_shapes=2, n_colours=2, seed=1)
    return root


def test_published_layout_loads_strictly_and_the_shape_comes_from_the_weights(published_layout, shapes_data, tiny_vae_ckpt, tmp_path):
    path, source = published_layout
    manifest = json.loads(reference_file('checkpoints.json').read_text())['var_d16.pth']
    block = {k: re.match(r'blocks\.(\d+)\.', k) for k in manifest if k != '__build__'}
    published_keys = {k for k, m in block.items() if m is None or int(m.group(1)) < TINY['depth']}
    assert set(source) == published_keys, 'the tiny file has the published key layout (blocks 0 and 1 of var_d16.pth)'

    out = tmp_path / 'run'   # no --depth, --vocab_size, --z_channels: the weights' values are taken
    ck, log = after_first_step(finetune_flags(shapes_data, out, path, f'--vae_ckpt={tiny_vae_ckpt}', *STATE_DICT_FLAGS,
                                              *FIRST_STEP_AT_LR_0), out)
    loaded = ck['trainer']['var_wo_ddp']
    assert_equal_but_class_emb(loaded, source)
    assert torch.equal(loaded['class_emb.weight'], source['class_emb.weight']), 'the same 6 classes: the class rows as they are'
    assert class_lines(log) == []
    vae = torch.load(tiny_vae_ckpt, map_location='cpu', weights_only=True)
    assert all(torch.equal(ck['trainer']['vae_local'][k], vae[k]) for k in vae), 'the tokenizer of --vae_ckpt'
    # weights only: a fresh optimizer (one step so far) at the start of the schedule; the start recorded in the args
    assert (ck['epoch'], ck['iter']) == (0, 1)
    assert {s['step'].item() for s in ck['trainer']['var_opt']['optimizer']['state'].values()} == {1}
    assert ck['args']['init_from'] == str(path)
    assert (ck['args']['depth'], ck['args']['vocab_size'], ck['args']['z_channels'], ck['args']['num_classes']) == (2, 64, 8, 6)
    assert 'flags not given, taken from them: depth=2, vocab_size=64, z_channels=8' in log


def test_fewer_classes_reinitialise_the_class_rows_as_a_fresh_model(published_layout, four_of_the_classes, tiny_vae_ckpt, tmp_path):
    path, source = published_layout
    out = tmp_path / 'run'
    ck, log = after_first_step(finetune_flags(four_of_the_classes, out, path, f'--vae_ckpt={tiny_vae_ckpt}', *STATE_DICT_FLAGS,
                                              *FIRST_STEP_AT_LR_0), out)
    loaded = ck['trainer']['var_wo_ddp']
    assert_equal_but_class_emb(loaded, source)
    emb = loaded['class_emb.weight']
    assert emb.shape == (4 + 1, 128)
    assert torch.equal(emb[:4], fresh_class_rows(seed=4, num_classes=4)[:4]), "the 4 class rows: a fresh model's (VAR's init)"
    assert torch.equal(emb[4], source['class_emb.weight'][6]), 'the null-class row: the source\'s'
    lines = class_lines(log)
    assert len(lines) == 1 and 'the 4 class rows re-initialised' in lines[0] and 'the weights have 6 classes' in lines[0], lines
    assert 'the weights record no class names' in lines[0] and 'the null-class row copied' in lines[0]


def test_classes_carried_over_by_name_from_a_save_pretrained_folder(tmp_path):
    """Same count (6), other classes: 4 shared by name carried over to their new ids, 2 new ones fresh; the folder's tokenizer."""
    from utils.class_names import write_classes_json
    from utils.toy_data import class_names, make_shapes_dataset
    vae, var = build_tiny(seed=6, num_classes=6)
    folder = tmp_path / 'saved'
    var.save_pretrained(folder)
    src_names = sorted(class_names(3, 2))     # the class folders of shapes_data: blue_circle, blue_hbar, blue_vbar, red_circle, ...
    write_classes_json(str(folder), src_names)
    data = tmp_path / 'data'
    new_names = sorted(make_shapes_dataset(str(data), train_per_class=2, val_per_class=1, size=64, n_shapes=2, n_colours=3))
    assert len(new_names) == 6 and len(set(new_names) & set(src_names)) == 4

    out = tmp_path / 'run'   # every shape flag (the tokenizer's too) from the folder's config.json and vae/config.json
    ck, log = after_first_step(finetune_flags(data, out, folder, *FIRST_STEP_AT_LR_0), out)
    loaded, source = ck['trainer']['var_wo_ddp'], var.state_dict()
    assert_equal_but_class_emb(loaded, source)
    emb, src_emb, fresh = loaded['class_emb.weight'], source['class_emb.weight'], fresh_class_rows(seed=4, num_classes=6)
    for j, name in enumerate(new_names):
        want = src_emb[src_names.index(name)] if name in src_names else fresh[j]
        assert torch.equal(emb[j], want), name
    assert torch.equal(emb[6], src_emb[6])
    lines = class_lines(log)
    assert len(lines) == 1 and '4 of the 6 classes carried over by name from the 6 of the weights' in lines[0], lines
    assert "2 re-initialised as a fresh model's" in lines[0]
    tok = vae.state_dict()
    assert all(torch.equal(ck['trainer']['vae_local'][k], tok[k]) for k in tok), 'the tokenizer of the same folder (vae/)'
    assert 'tokenizer weights: ' + str(folder) + '/vae (folder)' in log


def test_a_reference_trainer_checkpoint_gives_its_shape_tokenizer_and_weights(tiny_shapes, tmp_path):
    """The reference's train.py records neither the class count nor the tokenizer's shape: read off its weights, no flag given."""
    path = reference_file('ckpt_reference_tiny.pth')
    build = json.loads(reference_file('ckpt_reference_tiny.json').read_text())['build']
    ref = torch.load(path, map_location='cpu', weights_only=True)
    out = tmp_path / 'run'
    ck, log = after_first_step(finetune_flags(tiny_shapes, out, path, *FIRST_STEP_AT_LR_0), out)
    loaded, source = ck['trainer']['var_wo_ddp'], ref['trainer']['var_wo_ddp']
    assert_equal_but_class_emb(loaded, source)
    assert all(torch.equal(ck['trainer']['vae_local'][k], v) for k, v in ref['trainer']['vae_local'].items()), 'its vae_local'
    fresh = fresh_class_rows(4, 6, V=build['V'], Cvae=build['Cvae'], ch=build['ch'], patch_nums=build['patch_nums'])
    emb = loaded['class_emb.weight']
    assert torch.equal(emb[:6], fresh[:6]) and torch.equal(emb[6], source['class_emb.weight'][10]), 'fresh rows, the null row carried'
    assert "a checkpoint of the reference's train.py; inferred num_classes=10" in log
    assert 'its trained weights (var_wo_ddp; it has no EMA weights)' in log
    assert 'taken from them: depth=2, pn=1_2_3_4_6_8, vocab_size=512, z_channels=16, vae_ch=32' in log and len(class_lines(log)) == 1


def test_class_rows_of_the_same_count_without_a_name_in_common_are_taken_by_id():
    """ImageNet synset folders (n01440764, ...) against the published names (tench, ...): the rows stay, by id, and the log says so."""
    from utils.init_from import class_embedding_rows
    src_BC, fresh_BC = torch.randn(4, 8), torch.randn(4, 8)
    rows, note = class_embedding_rows(src_BC, fresh_BC, ['tench', 'goldfish', 'great white shark'], ['n01440764', 'n01443537', 'n01484850'])
    assert torch.equal(rows, src_BC) and note.startswith("class embedding: the 3 classes taken by id, as no class name of the data")
    rows, note = class_embedding_rows(src_BC, fresh_BC, ['a', 'b', 'c'], ['A', 'b', 'C'])   # the same names, case aside
    assert torch.equal(rows, src_BC) and note == ''
    rows, note = class_embedding_rows(src_BC, fresh_BC, ['a', 'b', 'c'], ['c', 'a', 'd'])
    assert [torch.equal(rows[j], want) for j, want in enumerate((src_BC[2], src_BC[0], fresh_BC[2], src_BC[3]))] == [True] * 4
    assert '2 of the 3 classes carried over by name' in note
    rows, note = class_embedding_rows(src_BC, fresh_BC[:3], ['a', 'b'], ['b', 'x'])   # names of the first classes only
    assert [torch.equal(rows[j], want) for j, want in enumerate((src_BC[1], fresh_BC[1], src_BC[3]))] == [True] * 3
    assert '1 of the 2 classes carried over by name from the 3 of the weights (b)' in note


@pytest.mark.parametrize('case', ['depth', 'pn', 'published depth', 'published file, none here', 'published name, a local copy'])
def test_a_shape_flag_that_disagrees_with_the_weights_is_one_error_line(case, published_layout, shapes_data, tiny_vae_ckpt, tmp_path):
    path, _ = published_layout
    argv = finetune_flags(shapes_data, tmp_path / 'out', path, f'--vae_ckpt={tiny_vae_ckpt}', '--vae_ch=32')
    env = script_env()
    if case == 'depth':
        argv += ['--pn=1_2_3_4', '--depth=3', '--saln=1']
        expected = (f'--init_from={path}: these flags disagree with its weights: --depth=3 (the weights: 2); '
                    '--saln=True (the weights: False)')
    elif case == 'pn':
        argv += ['--pn=1_2_3_5']
        expected = f'--pn=1_2_3_5 (4 scales, 39 tokens) does not fit --init_from={path} (4 scales, 30 tokens'
    else:   # the published var_d16.pth by name: checked against the flags before anything is read or downloaded
        argv = ['train.py', f'--data_path={shapes_data}', f'--local_out_dir_path={tmp_path / "out"}', '--init_from=var_d16.pth']
        if case == 'published depth':
            argv += ['--depth=20', '--pn=256']
            expected = '--init_from=var_d16.pth: these flags disagree with its weights: --depth=20 (the weights: 16)'
        elif case == 'published file, none here':
            expected = 'var_d16.pth is not at var_d16.pth and could not be downloaded from the Hugging Face repo FoundationVision/var'
            env = script_env(HF_HOME=tmp_path / 'hf')
        else:   # a file of that name in the working folder is the local copy, read instead of the Hub (and it is not a d16)
            torch.save(torch.load(path, weights_only=True), tmp_path / 'var_d16.pth')
            expected = (f'--init_from=var_d16.pth: the published var_d16.pth ({tmp_path / "var_d16.pth"}) does not fit the VAR of its '
                        f'shape')
    # run in tmp_path, where a published file name finds the local copy, if any
    res = run_script([str(REPO / argv[0]), *map(str, argv[1:])], check=False, env=env, cwd=tmp_path)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(err) == 1 and err[0].startswith('error: ') and expected in err[0], res.stderr[-3000:]
    assert not (tmp_path / 'out' / 'ar-ckpt-last.pth').exists()


def test_a_resumable_checkpoint_wins_over_init_from(published_layout, tiny_shapes, tiny_vae_ckpt, tmp_path):
    path, source = published_layout
    src = tmp_path / 'source.pth'
    torch.save(source, src)
    out = tmp_path / 'run'
    argv = finetune_flags(tiny_shapes, out, src, f'--vae_ckpt={tiny_vae_ckpt}', *STATE_DICT_FLAGS, '--bs=8', '--ep=2', '--seed=4',
                          '--ckpt_every_it=2', '--vis_every_ep=-1', '--save_pretrained=0')
    # 3 iterations per epoch, a checkpoint every 2: killed right after the one at iteration 4 (epoch 1, iteration 1)
    run_and_kill_after_checkpoint(argv, out / 'ar-ckpt-last.pth', kill_at_iter=4)
    src.unlink()   # the rerun must not need the weights it started from
    res = run_script(argv)
    assert f'the resumable checkpoint in {out} wins over --init_from' in res.stdout
    assert f'--init_from={src} is not read again' in res.stdout and 'at epoch 1, iteration 1' in res.stdout
    assert '--init_from: the weights of' not in res.stdout
    ck = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ck['epoch'], ck['iter']) == (2, 0) and ck['args']['init_from'] == str(src) and ck['args']['depth'] == 2
    assert {s['step'].item() for s in ck['trainer']['var_opt']['optimizer']['state'].values()} == {6}


def first_iteration_loss(out):
    from test_train import read_scalars
    return dict(read_scalars(out)['AR_iter_loss/L_mean'])[0]


def test_finetuning_starts_below_a_run_from_scratch(pretrained_run, four_of_the_classes, tiny_vae_ckpt, tmp_path):
    flags = ['--bs=8', '--ep=1', '--fixed_tlr=3e-3', '--seed=4', '--vis_every_ep=-1', '--save_pretrained=0']
    ckpt = pretrained_run / 'ar-ckpt-last.pth'
    res = run_script(finetune_flags(four_of_the_classes, tmp_path / 'ft', ckpt, *flags))
    assert f'{ckpt} (a train.py checkpoint at epoch 3, iteration 0: its EMA weights (var_ema))' in res.stdout
    assert len(class_lines(res.stdout)) == 1
    run_script(['train.py', f'--data_path={four_of_the_classes}', f'--local_out_dir_path={tmp_path / "scratch"}',
                f'--vae_ckpt={tiny_vae_ckpt}', *TINY_TRAIN_FLAGS, *flags])
    ft, scratch = first_iteration_loss(tmp_path / 'ft'), first_iteration_loss(tmp_path / 'scratch')
    assert ft < scratch - 0.5, (ft, scratch)
