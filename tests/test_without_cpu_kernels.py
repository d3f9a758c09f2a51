"""The project works without the optional cpu_kernels package: the model tests pass in a process where importing it
fails (a meta-path hook on PYTHONPATH's sitecustomize), and the scripts' one converting call leaves the plain models."""
import re
import subprocess
import sys

from conftest import REPO, script_env

BLOCK = '''import sys


class _NoCpuKernels:
    """Refuse cpu_kernels and its modules, as if the package had been deleted."""

    def find_spec(self, name, path=None, target=None):
        if name == 'cpu_kernels' or name.startswith('cpu_kernels.'):
            raise ImportError(f'{name} made unimportable for this test')
        return None


sys.meta_path.insert(0, _NoCpuKernels())
'''

CHECK = '''
import pytest

from models import build_vae_var
from utils.cpu_speed import available, speed_up


def test_cpu_kernels_is_unimportable_and_speed_up_leaves_the_plain_models():
    with pytest.raises(ImportError, match='made unimportable'):
        import cpu_kernels  # noqa: F401
    vae, var = build_vae_var(device='cpu', V=64, Cvae=8, ch=32, patch_nums=(1, 2), num_classes=3, depth=1)
    before = [type(m) for m in list(vae.modules()) + list(var.modules())]
    speed_up(vae, var)
    assert not available() and [type(m) for m in list(vae.modules()) + list(var.modules())] == before
'''
# the two slowest model tests (bf16 autocast, activation checkpointing) touch nothing of the CPU package; the suite runs them
SLOWEST = 'not (test_autocast_forward_and_sampling_on_cpu and dtype1) and not test_grad_checkpointing_gives_the_same_gradients'


def _env(tmp_path) -> dict:
    (tmp_path / 'sitecustomize.py').write_text(BLOCK)
    env = script_env()
    env['PYTHONPATH'] = f"{tmp_path}:{env['PYTHONPATH']}"
    return env


def test_the_model_tests_pass_with_cpu_kernels_unimportable(tmp_path):
    env = _env(tmp_path)
    (tmp_path / 'test_plain_speed_up.py').write_text(CHECK)
    tests = ['tests/test_models.py', 'tests/test_golden.py', 'tests/test_sampling.py', str(tmp_path / 'test_plain_speed_up.py')]
    res = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rA', '-p', 'no:cacheprovider', '-k', SLOWEST, *tests], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = res.stdout.strip().splitlines()[-1]
    passed = int(re.search(r'(\d+) passed', summary).group(1))
    skipped = int((re.search(r'(\d+) skipped', summary) or re.search('(0)', '0')).group(1))
    assert 'failed' not in summary and 'error' not in summary and passed >= 40, summary
    assert 'PASSED ' in res.stdout and 'test_cpu_kernels_is_unimportable_and_speed_up_leaves_the_plain_models' in res.stdout
    assert skipped <= 10, summary   # the golden file's tests of the converted models, and nothing else
