"""evaluate.py: the Fréchet distance against scipy, and the whole command offline with Inception weights made for the test."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import REPO, run_script, script_env
from evaluate import frechet_distance, iter_npz_images


def scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


@pytest.mark.parametrize('dim, n', [(8, 50), (64, 300), (64, 40)])   # the last: singular covariances
def test_frechet_distance_agrees_with_scipy(dim, n):
    rng = np.random.default_rng(dim + n)
    a = rng.normal(size=(n, dim))
    b = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + 0.5
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(scipy_frechet(*args), rel=1e-6, abs=1e-6)
    assert frechet_distance(args[0], args[1], args[0], args[1]) == pytest.approx(0, abs=1e-6)


def fake_inception_weights(path):
    """InceptionV3 weights in torch-fidelity's layout, made here (random), so nothing is downloaded."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    torch.save({}, str(path) + '.empty')
    orig = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, strict=True: None   # keep the random init
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'], feature_extractor_weights_path=str(path) + '.empty')
    finally:
        FeatureExtractorInceptionV3.load_state_dict = orig
    torch.save(net.state_dict(), path)


def test_evaluate_offline_on_small_npz_files(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    smp = np.clip(ref.astype(int) + rng.integers(-40, 40, size=ref.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / 'ref.npz', arr_0=ref)
    np.savez_compressed(tmp_path / 'samples.npz', arr_0=smp)   # compressed npz too
    n, batches = iter_npz_images(str(tmp_path / 'samples.npz'), 10)
    assert n == 12 and np.array_equal(np.concatenate(list(batches)), smp)
    weights = tmp_path / 'inception.pth'
    fake_inception_weights(weights)
    res = run_script(['evaluate.py', str(tmp_path / 'ref.npz'), str(tmp_path / 'samples.npz'), f'--inception_weights={weights}',
                      '--bs=5', '--splits=2', f'--out_json={tmp_path / "m.json"}'], timeout=600)
    for key in ('Inception Score:', 'FID:', 'Precision:', 'Recall:'):
        assert key in res.stdout
    m = json.loads((tmp_path / 'm.json').read_text())
    assert m['n_samples'] == m['n_ref'] == 12 and m['fid'] > 0 and 0 <= m['precision'] <= 1 and 0 <= m['recall'] <= 1
    # the same set against itself: FID 0, precision and recall 1
    res = run_script(['evaluate.py', str(tmp_path / 'ref.npz'), str(tmp_path / 'ref.npz'), f'--inception_weights={weights}',
                      '--bs=6', '--splits=2', f'--out_json={tmp_path / "self.json"}'], timeout=600)
    s = json.loads((tmp_path / 'self.json').read_text())
    assert abs(s['fid']) < 1e-3 and s['precision'] == 1 and s['recall'] == 1


def test_evaluate_offline_without_weights_says_what_to_fetch(tmp_path):
    np.savez(tmp_path / 'a.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    res = run_script([str(REPO / 'evaluate.py'), str(tmp_path / 'a.npz'), str(tmp_path / 'a.npz')], check=False,
                     env=script_env(TORCH_HOME=tmp_path / 'th'), cwd=tmp_path, timeout=300)
    assert res.returncode == 1
    assert 'weights-inception-2015-12-05-6726825d.pth' in res.stderr and '--inception_weights' in res.stderr
    np.savez(tmp_path / 'bad.npz', arr_0=np.zeros((2, 8, 8), np.float32))
    res = run_script(['evaluate.py', str(tmp_path / 'bad.npz'), str(tmp_path / 'a.npz')], check=False)
    assert res.returncode == 1 and 'expected uint8 (N, H, W, 3) images' in res.stderr
