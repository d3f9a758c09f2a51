"""evaluate.py: the Fréchet distance against scipy, and the whole command offline with Inception weights made for the test."""
import json
import os
import re

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


def fake_inception_weights(path, calibration_images):
    """InceptionV3 weights in torch-fidelity's layout, made here (random), so nothing is downloaded. The batch norms take
    the statistics of the calibration images, so that the features are of order one."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    torch.save({}, str(path) + '.empty')
    orig = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, strict=True: None   # keep the random init
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'], feature_extractor_weights_path=str(path) + '.empty')
    finally:
        FeatureExtractorInceptionV3.load_state_dict = orig
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(calibration_images).permute(0, 3, 1, 2).contiguous())
    torch.save(net.state_dict(), path)


def toy_images(rng, n_noise, n_flat, n_ramp):
    """(n, 32, 32, 3) uint8: noise, flat colours, horizontal colour ramps."""
    noise = rng.integers(0, 256, size=(n_noise, 32, 32, 3))
    flat = np.broadcast_to(rng.integers(0, 256, size=(n_flat, 1, 1, 3)), (n_flat, 32, 32, 3))
    ramp = np.broadcast_to(np.linspace(0, 1, 32)[None, :, None, None] * rng.integers(0, 256, size=(n_ramp, 1, 1, 3)), (n_ramp, 32, 32, 3))
    return np.concatenate([noise, flat, ramp]).astype(np.uint8)


def expected_metrics(ref_pool, pool, logits, splits, k):
    """FID, Inception Score (mean, std over splits) and precision/recall written out here in numpy from their definitions."""
    # FID: tr (Σ1 Σ2)^½ is the sum of the singular values of A Bᵀ / √((n1 − 1)(n2 − 1)), A and B the centred features
    A, B = ref_pool - ref_pool.mean(0), pool - pool.mean(0)
    tr_sqrt = np.linalg.svd(A @ B.T, compute_uv=False).sum() / np.sqrt((len(A) - 1) * (len(B) - 1))
    mu = ref_pool.mean(0) - pool.mean(0)
    fid = mu @ mu + (A * A).sum() / (len(A) - 1) + (B * B).sum() / (len(B) - 1) - 2 * tr_sqrt
    # IS: exp E_x KL(p(y|x) ‖ p(y)) per split of the samples, in order: rows i·N//splits to (i + 1)·N//splits, as in the original code
    log_p = logits - logits.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    scores = []
    for i in range(splits):
        part = log_p[i * len(log_p) // splits:(i + 1) * len(log_p) // splits]
        log_q = np.log(np.exp(part).mean(0))
        scores.append(np.exp((np.exp(part) * (part - log_q)).sum(1).mean()))
    # precision: samples within the k-NN ball of some real image; recall: real images within that of some sample

    def dist(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    radius_ref, radius_smp = np.sort(dist(ref_pool, ref_pool), 1)[:, k], np.sort(dist(pool, pool), 1)[:, k]
    precision = (dist(pool, ref_pool) <= radius_ref[None]).any(1).mean()
    recall = (dist(ref_pool, pool) <= radius_smp[None]).any(1).mean()
    return dict(fid=fid, inception_score=np.mean(scores), inception_score_std=np.std(scores), precision=precision, recall=recall)


def test_evaluate_offline_matches_the_metrics_computed_here(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    weights = tmp_path / 'inception.pth'
    fake_inception_weights(weights, toy_images(np.random.default_rng(0), 1, 1, 0))
    rng = np.random.default_rng(0)
    ref, smp = toy_images(rng, 4, 2, 2), toy_images(rng, 2, 3, 3)   # precision 0.75, recall 0.375 with k = 1
    np.savez(tmp_path / 'ref.npz', arr_0=ref)
    np.savez_compressed(tmp_path / 'samples.npz', arr_0=smp)   # compressed npz too
    n, batches = iter_npz_images(str(tmp_path / 'samples.npz'), 4)
    assert n == 8 and np.array_equal(np.concatenate(list(batches)), smp)
    res = run_script(['evaluate.py', str(tmp_path / 'ref.npz'), str(tmp_path / 'samples.npz'), f'--inception_weights={weights}',
                      '--bs=3', '--splits=3', '--k=1', f'--out_json={tmp_path / "m.json"}'], timeout=600)
    m = json.loads((tmp_path / 'm.json').read_text())
    for line in (f'FID: {m["fid"]:.4f}', f'Inception Score: {m["inception_score"]:.4f}', f'Precision: {m["precision"]:.4f}',
                 f'Recall: {m["recall"]:.4f}'):
        assert line in res.stdout
    # the same metrics from the same network's features, computed here
    net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'], feature_extractor_weights_path=str(weights)).eval()
    with torch.no_grad():
        ref_pool, _ = (t.double().numpy() for t in net(torch.from_numpy(ref).permute(0, 3, 1, 2).contiguous()))
        pool, logits = (t.double().numpy() for t in net(torch.from_numpy(smp).permute(0, 3, 1, 2).contiguous()))
    want = expected_metrics(ref_pool, pool, logits, splits=3, k=1)
    assert m['n_samples'] == m['n_ref'] == 8
    assert want['fid'] > 1 and 0 < want['precision'] < 1 and 0 < want['recall'] < 1 and want['precision'] != want['recall']
    assert want['inception_score_std'] > 1e-3
    for key, value in want.items():
        assert m[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def offline_env(tmp_path, **extra):
    """A script environment in which every download goes to an unreachable local proxy, and an empty torch hub cache."""
    import socket
    with socket.socket() as s:   # a local port nobody listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    proxy = f'http://127.0.0.1:{port}'
    env = script_env(TORCH_HOME=tmp_path / 'torch_home', https_proxy=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, HTTP_PROXY=proxy, **extra)
    for k in ('no_proxy', 'NO_PROXY'):
        env.pop(k, None)
    return env


def test_evaluate_offline_without_weights_says_what_to_fetch(tmp_path):
    np.savez(tmp_path / 'a.npz', arr_0=np.zeros((12, 8, 8, 3), np.uint8))
    res = run_script([str(REPO / 'evaluate.py'), str(tmp_path / 'a.npz'), str(tmp_path / 'a.npz')], check=False,
                     env=offline_env(tmp_path), cwd=tmp_path, timeout=300)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert 'weights-inception-2015-12-05-6726825d.pth' in res.stderr and '--inception_weights' in res.stderr
    assert 'URLError' in res.stderr and 'Connection refused' in res.stderr   # the download went to the local proxy, and failed
    assert not list((tmp_path / 'torch_home').rglob('*.pth'))
    np.savez(tmp_path / 'bad.npz', arr_0=np.zeros((2, 8, 8), np.float32))
    res = run_script(['evaluate.py', str(tmp_path / 'bad.npz'), str(tmp_path / 'a.npz')], check=False)
    assert res.returncode == 1 and 'expected uint8 (N, H, W, 3) images' in res.stderr


def write_npz_member(path, header_shape, pixels: bytes):
    """An npz whose arr_0.npy declares header_shape uint8 but holds only these pixel bytes."""
    import io
    import zipfile
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {'descr': '|u1', 'fortran_order': False, 'shape': header_shape})
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr('arr_0.npy', head.getvalue() + pixels)


@pytest.fixture
def no_network_load(monkeypatch):
    """evaluate() must stop before the Inception network is loaded."""
    import evaluate

    def refuse(*a, **k):
        raise AssertionError('the Inception network was loaded before the inputs were checked')
    monkeypatch.setattr(evaluate, 'load_inception', refuse)
    return evaluate.evaluate


def test_truncated_or_non_npz_files_are_refused_before_any_work(tmp_path, no_network_load):
    from evaluate import EvaluationInputError
    good = tmp_path / 'good.npz'
    np.savez(good, arr_0=np.zeros((12, 8, 8, 3), np.uint8))
    (tmp_path / 'text.npz').write_text('not an npz')
    (tmp_path / 'cut.npz').write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    write_npz_member(tmp_path / 'short.npz', (12, 8, 8, 3), bytes(6 * 8 * 8 * 3))
    np.savez(tmp_path / 'other.npz', arr_1=np.zeros((12, 8, 8, 3), np.uint8))
    cases = {'text.npz': 'is not an npz with arr_0', 'cut.npz': 'is not an npz with arr_0, or it is truncated',
             'short.npz': 'is truncated: arr_0 (12, 8, 8, 3) needs 2304 bytes of pixels, the file holds 1152',
             'other.npz': 'is not an npz with arr_0', 'missing.npz': 'does not exist'}
    for name, msg in cases.items():
        for args in ((good, tmp_path / name), (tmp_path / name, good)):
            with pytest.raises(EvaluationInputError, match=re.escape(f'{tmp_path / name}') + '.*' + re.escape(msg)):
                no_network_load(str(args[0]), str(args[1]), splits=2)
    res = run_script(['evaluate.py', str(good), str(tmp_path / 'short.npz')], check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr and 'is truncated' in res.stderr


def test_bad_settings_are_refused_before_any_work(tmp_path, no_network_load):
    from evaluate import EvaluationInputError
    a = tmp_path / 'a.npz'
    np.savez(a, arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    cases = [(dict(bs=0), '--bs=0 must be an integer >= 1'), (dict(splits=0), '--splits=0 must be an integer >= 1'),
             (dict(k=-1), '--k=-1 must be an integer >= 1'),
             (dict(k=5), 'holds 5 images; precision and recall with --k=5 neighbours need more than 5: give more images or a --k between 1 and 4'),
             (dict(splits=6), '--splits=6 needs at least 6 samples; ' + str(a) + ' holds 5: use --splits between 1 and 5'),
             (dict(device='gpu0'), '--device=gpu0 is not a device name'),
             (dict(inception_weights=str(tmp_path / 'no.pth')), f'--inception_weights={tmp_path / "no.pth"} does not exist')]
    if not torch.cuda.is_available():
        cases.append((dict(device='cuda'), '--device=cuda: this machine has 0 CUDA devices'))
    for kw, msg in cases:
        with pytest.raises(EvaluationInputError, match=re.escape(msg)):
            no_network_load(str(a), str(a), **{'splits': 2, **kw})
    res = run_script(['evaluate.py', str(a), str(a), '--bs=0'], check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr and 'error: --bs=0 must be an integer >= 1' in res.stderr
    res = run_script(['evaluate.py', str(a), str(a), f'--out_json={tmp_path / "no" / "m.json"}'], check=False)
    assert res.returncode == 1 and f'--out_json={tmp_path / "no" / "m.json"}: the folder {tmp_path / "no"} does not exist' in res.stderr


class RunsCodeWhenUnpickled:
    """Unpickling this object creates a file: what a crafted weights file could do with a full unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def test_inception_weights_are_read_with_weights_only(tmp_path):
    from evaluate import EvaluationInputError, load_inception
    marker = tmp_path / 'code_ran'
    crafted = tmp_path / 'weights-inception-2015-12-05-6726825d.pth'
    torch.save({'fc.weight': torch.zeros(1), 'payload': RunsCodeWhenUnpickled(marker)}, crafted)
    with pytest.raises(EvaluationInputError, match='could not be loaded from .*weights-inception.*UnpicklingError'):
        load_inception(str(crafted), torch.device('cpu'))
    assert not marker.exists(), 'the weights file ran code'


def test_fid_uses_the_statistics_a_reference_batch_stores(tmp_path, monkeypatch):
    """The OpenAI reference batches store 'mu' and 'sigma' of the whole reference set; FID is taken against those (as their
    evaluator does), not against the features of the few images of arr_0; precision and recall still use arr_0. The
    network is replaced by fixed features per file (the whole path through Inception is the test above)."""
    import evaluate
    rng = np.random.default_rng(1)
    feats = {'ref': rng.normal(size=(12, 2048)), 'smp': rng.normal(size=(9, 2048)) + 0.5}
    logits = {'ref': rng.normal(size=(12, 1008)), 'smp': rng.normal(size=(9, 1008))}
    monkeypatch.setattr(evaluate, 'load_inception', lambda weights, device: 'net')
    monkeypatch.setattr(evaluate, 'inception_features',
                        lambda net, path, bs, device: (feats[os.path.basename(path)[:3]], logits[os.path.basename(path)[:3]]))
    mu, a = rng.normal(size=2048), rng.normal(size=(2048, 64))
    sigma = a @ a.T / 64
    images = np.zeros((12, 8, 8, 3), np.uint8)
    np.savez(tmp_path / 'ref_plain.npz', arr_0=images)
    np.savez(tmp_path / 'ref_stats.npz', arr_0=images, mu=mu, sigma=sigma)
    np.savez(tmp_path / 'smp.npz', arr_0=images[:9])
    kw = dict(bs=4, splits=2, k=1, device='cpu')
    plain = evaluate.evaluate(str(tmp_path / 'ref_plain.npz'), str(tmp_path / 'smp.npz'), **kw)
    stored = evaluate.evaluate(str(tmp_path / 'ref_stats.npz'), str(tmp_path / 'smp.npz'), **kw)
    pool = feats['smp']
    assert stored['fid'] == pytest.approx(frechet_distance(pool.mean(0), np.cov(pool, rowvar=False), mu, sigma), rel=1e-9)
    assert abs(stored['fid'] - plain['fid']) > 1   # plain: arr_0's statistics (the test above checks that value)
    assert (stored['fid_reference_stats'], plain['fid_reference_stats']) == ('stored mu/sigma', 'arr_0')
    for key in ('precision', 'recall', 'inception_score'):
        assert stored[key] == plain[key], key
    np.savez(tmp_path / 'ref_half.npz', arr_0=images, mu=mu)
    with pytest.raises(evaluate.EvaluationInputError, match='mu without sigma'):
        evaluate.evaluate(str(tmp_path / 'ref_half.npz'), str(tmp_path / 'smp.npz'), **kw)
