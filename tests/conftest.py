"""Shared fixtures: the reference data folder and tiny models."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get('VAR_REFERENCE_DIR', REPO.parent / 'shared' / 'reference'))

TINY = dict(V=64, Cvae=8, ch=32, share_quant_resi=4, patch_nums=(1, 2, 3, 4), num_classes=5, depth=2)


def reference_file(name: str) -> Path:
    """Path of a reference file; when it is absent, skips the test saying where it was looked for, or fails
    it when VAR_REQUIRE_REFERENCE=1 (as .ci/run sets, so CI never passes with these tests skipped)."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        msg = f'reference file {path} is absent (set VAR_REFERENCE_DIR to the folder holding {name})'
        if os.environ.get('VAR_REQUIRE_REFERENCE') == '1':
            pytest.fail(msg + '; VAR_REQUIRE_REFERENCE=1 makes that a failure', pytrace=False)
        pytest.skip(msg)
    return path


def build_tiny(seed: int = 0, fast: bool = False, **overrides):
    """A tiny tokenizer + VAR on the CPU with every parameter randomised (no branch near zero); fast=True: converted
    by cpu_kernels.convert (for the tests of the CPU paths)."""
    from models import build_vae_var
    kw = dict(TINY, flash_if_available=False, fused_if_available=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    vae, var = build_vae_var(device='cpu', **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(vae.named_parameters()) + list(var.named_parameters()):
            if name.endswith('scale_mul_1H11'):
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and 'embedding' not in name and 'emb' not in name and 'pos_' not in name:
                p.copy_(noise / (p[0].numel() ** 0.5))      # weights: unit-scale activations
            elif p.ndim == 1 and name.endswith('weight'):
                p.copy_(1 + 0.1 * noise)                      # norm weights
            else:
                p.copy_(0.5 * noise if p.ndim >= 2 else 0.1 * noise)  # embeddings, positions, biases
    vae.eval()
    var.eval()
    if fast:
        import cpu_kernels
        cpu_kernels.convert(vae)
        cpu_kernels.convert(var)
    return vae, var


@pytest.fixture
def tiny():
    return build_tiny()


def cpu_kernels_importable() -> bool:
    """Whether the optional CPU package can be imported (tests of the models run without it too)."""
    try:
        import cpu_kernels  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(autouse=True)
def fast_kernels_on():
    """Every test starts with the fast kernels on (cpu_kernels' switch is process-wide), and a test that turns
    them off (`cpu_kernels.set_fast_paths(False)`) leaves them on for the next one."""
    if not cpu_kernels_importable():
        yield
        return
    from cpu_kernels import fast_paths
    with fast_paths(True):
        yield


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(vendor, flags, cores) makes cpu_kernels read that CPU (vendor_id and flags as /proc/cpuinfo writes
    them) and choose its kernels again; the real CPU's choice comes back after the test."""
    from cpu_kernels import choices
    from cpu_kernels.cpu_rules import CpuFeatures

    def fake(vendor: str, flags: str, cores: int) -> CpuFeatures:
        features = CpuFeatures(vendor=vendor, flags=frozenset(flags.split()), cores=cores)
        monkeypatch.setattr(choices, 'read_cpu_features', lambda: features)
        choices.cpu_rule.cache_clear()
        return features
    yield fake
    choices.cpu_rule.cache_clear()


@pytest.fixture
def cpu_with_fast_kernels(fake_cpu):
    """A CPU on which every CPU-chosen fast kernel is on (AMD with AVX-512 and 2 cores, the rule that chooses them all), whatever runs the test."""
    return fake_cpu('AuthenticAMD', 'avx2 avx512f', 2)


TINY_TRAIN_FLAGS = ['--vocab_size=64', '--z_channels=8', '--vae_ch=32', '--pn=1_2_3_4', '--depth=2']


def script_env(**extra) -> dict:
    """Environment for running a project script in a subprocess: offline, one thread, repo on the path."""
    env = dict(os.environ)
    # the repo first, then whatever was on the path (packages installed from wheels on a GPU machine, say)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get('PYTHONPATH', '')) if p)
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=pythonpath, HF_HUB_OFFLINE='1', PYTHONUNBUFFERED='1')
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(argv, timeout=300, check=True, torchrun_procs=0, env=None, cwd=None):
    """Run `python <argv>` (or torchrun with that many processes); returns the CompletedProcess."""
    import subprocess
    import sys
    if torchrun_procs:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun_procs}'] + list(argv)
    else:
        cmd = [sys.executable] + list(argv)
    res = subprocess.run(cmd, cwd=cwd or REPO, env=env or script_env(), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)} failed ({res.returncode}):\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}')
    return res


@pytest.fixture(scope='session')
def shapes_data(tmp_path_factory):
    """A small built-in dataset: 6 classes of 64 px shapes, 16 train and 4 val images per class."""
    from utils.toy_data import make_shapes_dataset
    root = tmp_path_factory.mktemp('shapes')
    make_shapes_dataset(str(root), train_per_class=16, val_per_class=4, size=64)
    return root


@pytest.fixture(scope='session')
def tiny_vae_ckpt(tmp_path_factory):
    """A tiny tokenizer's weights (64 codes, 8 channels, scales 1,2,3,4: 64 px images)."""
    vae, _ = build_tiny(seed=11)
    path = tmp_path_factory.mktemp('vae') / 'tiny_vae.pth'
    torch.save(vae.state_dict(), path)
    return path


def run_and_kill_after_checkpoint(argv, ckpt_path, delay=0.3, timeout=240, kill_at_iter=None):
    """Run `python argv` until it is killed by SIGKILL; returns the exit code (-9).

    kill_at_iter=N (deterministic, for train.py and train_vae.py): the process kills itself right after it has
    written the checkpoint of global iteration >= N (the test-only variable VAR_TEST_SIGKILL_AT_ITER, see
    utils/run.py). Otherwise it is killed `delay` seconds after `ckpt_path` first appears.
    The child's output goes to <output folder>.child-output.txt beside the output folder; it is shown in the
    error when the child ends other than by the kill, or when `ckpt_path` never appears.
    """
    import signal
    import subprocess
    import sys
    import time
    ckpt_path = Path(ckpt_path)
    log_path = ckpt_path.parent.parent / f'{ckpt_path.parent.name}.child-output.txt'
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = script_env() if kill_at_iter is None else script_env(VAR_TEST_SIGKILL_AT_ITER=kill_at_iter)

    def fail(why):
        raise AssertionError(f'{" ".join(map(str, argv))}: {why}\n--- child output ({log_path})\n{log_path.read_text()[-6000:]}')

    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable] + list(map(str, argv)), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if kill_at_iter is None:
                deadline = time.time() + timeout
                while not ckpt_path.exists() and time.time() < deadline and proc.poll() is None:
                    time.sleep(0.02)
                if not ckpt_path.exists():
                    proc.kill()
                    proc.wait()
                    fail(f'{ckpt_path} did not appear (exit code {proc.returncode})')
                time.sleep(delay)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            fail(f'still running after {timeout} s')
    if rc != -signal.SIGKILL:
        fail(f'ended with exit code {rc} instead of being killed' + ('' if kill_at_iter is not None else f' (it finished within {delay} s of {ckpt_path.name})'))
    if not ckpt_path.exists():
        fail(f'killed, but {ckpt_path} does not exist')
    return rc


@pytest.fixture(scope='session')
def tiny_shapes(tmp_path_factory):
    """An even smaller built-in dataset for the slow tokenizer tests: 6 classes, 4 train and 1 val image each."""
    from utils.toy_data import make_shapes_dataset
    root = tmp_path_factory.mktemp('tiny_shapes')
    make_shapes_dataset(str(root), train_per_class=4, val_per_class=1, size=64)
    return root
