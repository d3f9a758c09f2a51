"""FID, Inception Score, precision and recall of a sample npz against a reference npz.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples/d16.npz
    python evaluate.py ref.npz samples.npz --inception_weights=weights-inception-2015-12-05-6726825d.pth

Both files hold arr_0 (N, H, W, 3) uint8, like the OpenAI evaluator's reference batches and
sample.py's output; they are read in batches, never whole. Features come from torch-fidelity's
InceptionV3 with the standard TensorFlow FID weights (`--inception_weights`, or the usual download
into the torch hub cache; offline, the error says what to fetch), read with torch.load(weights_only=True).
FID uses the 2048-d pool features (against the reference batch's stored 'mu' and 'sigma' where it has them, as the
OpenAI evaluator does), IS the 1008 logits (10 splits), precision and recall the pool features with k = 3 neighbours. Every flag and both files are checked before the network is loaded.
"""
import io
import json
import logging
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from utils.flags import flag, parse_dataclass
from utils.cli import UserError, run_main
from utils.log import setup_logging
from utils.misc import open_npz_arr0, read_npz_manifest

__all__ = ['frechet_distance', 'iter_npz_images', 'inception_features', 'read_reference_stats', 'evaluate']

logger = logging.getLogger('evaluate')

INCEPTION_URL = 'https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth'


class EvaluationInputError(UserError, ValueError):
    """An npz that cannot be evaluated, or Inception weights that cannot be had."""


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½, in float64.

    tr (Σ1 Σ2)^½ = Σ √λ of the symmetric PSD matrix Σ1^½ Σ2 Σ1^½, computed with symmetric
    eigendecompositions (no complex parts, no failure on singular covariances).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _open_arr0(path: str):
    """(zip, arr_0 stream positioned after the header, shape); checks it holds all the bytes of uint8 (N, H, W, 3) images."""
    if not os.path.isfile(path):
        raise EvaluationInputError(f'{path} does not exist')
    try:
        zf, f, shape, fortran, dtype = open_npz_arr0(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise EvaluationInputError(f'{path} is not an npz with arr_0, or it is truncated ({type(e).__name__}: {e})') from None
    problem = None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        problem = f'{path}: arr_0 is {dtype} {shape}, expected uint8 (N, H, W, 3) images'
    else:
        need, have = int(np.prod(shape)), zf.getinfo('arr_0.npy').file_size - f.tell()
        if have < need:
            problem = f'{path} is truncated: arr_0 {shape} needs {need} bytes of pixels, the file holds {have}'
    if problem:
        f.close()
        zf.close()
        raise EvaluationInputError(problem)
    return zf, f, shape


def npz_shape(path: str) -> Tuple[int, ...]:
    zf, f, shape = _open_arr0(path)
    f.close()
    zf.close()
    return shape


def iter_npz_images(path: str, bs: int) -> Tuple[int, Iterator[np.ndarray]]:
    """(number of images, iterator of (b, H, W, 3) uint8 batches) of an npz's arr_0, streamed from the zip."""
    shape = npz_shape(path)
    n, per = shape[0], int(np.prod(shape[1:]))

    def gen():
        zf, f, _ = _open_arr0(path)
        try:
            for start in range(0, n, bs):
                cnt = min(bs, n - start)
                buf = f.read(cnt * per)
                if len(buf) != cnt * per:
                    raise EvaluationInputError(f'{path} is truncated')
                yield np.frombuffer(buf, dtype=np.uint8).reshape(cnt, *shape[1:])
        finally:
            f.close()
            zf.close()
    return n, gen()


def load_inception(weights: Optional[str], device: torch.device):
    """torch-fidelity's TF-compatible InceptionV3 (pool features and 1008 unbiased logits).

    The weights (a local file, or the download cached in the torch hub folder) are read with
    weights_only=True; torch-fidelity, which would unpickle them in full, gets only a copy of that
    plain state dict re-serialised in memory.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    if weights and not os.path.isfile(weights):
        raise EvaluationInputError(f'--inception_weights {weights} does not exist')
    try:
        if weights:
            state = torch.load(weights, map_location='cpu', weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(INCEPTION_URL, map_location='cpu', progress=False, weights_only=True)
        plain = io.BytesIO()
        torch.save(state, plain)
        plain.seek(0)
        net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'], feature_extractor_weights_path=plain)
    except Exception as e:   # offline, unreachable, or a file of another layout
        raise EvaluationInputError(
            f'the InceptionV3 FID weights could not be loaded from {weights or INCEPTION_URL} ({type(e).__name__}: {str(e)[:200]}). '
            f'Download {INCEPTION_URL} on a connected machine and pass it with --inception_weights') from None
    return net.to(device).eval()


@torch.no_grad()
def inception_features(net, path: str, bs: int, device: torch.device) -> Tuple[np.ndarray, np.ndarray]:
    """(pool features (N, 2048), logits (N, 1008)) of the images of an npz, in float64."""
    n, batches = iter_npz_images(path, bs)
    pools, logits = [], []
    t, done = time.time(), 0
    for arr in batches:
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(device)
        pool, logit = net(x)
        pools.append(pool.double().cpu().numpy())
        logits.append(logit.double().cpu().numpy())
        done += len(arr)
        logger.info('%s: %d/%d images (%.1f img/s)', os.path.basename(path), done, n, done / max(time.time() - t, 1e-9))
    return np.concatenate(pools), np.concatenate(logits)


def check_settings(bs: int, splits: int, k: int, device: Optional[str], inception_weights: Optional[str]) -> torch.device:
    """The device to use; an EvaluationInputError naming the flag, its value and the allowed range for a bad setting."""
    for flag, value in (('--bs', bs), ('--splits', splits), ('--k', k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvaluationInputError(f'{flag}={value!r} must be an integer >= 1')
    if inception_weights and not os.path.isfile(inception_weights):
        raise EvaluationInputError(f'--inception_weights={inception_weights} does not exist; give a local copy of {INCEPTION_URL}, '
                                   f'or leave the flag out to use the download cached in the torch hub folder')
    if not device:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvaluationInputError(f'--device={device} is not a device name; use cpu, cuda or cuda:N') from None
    if dev.type == 'cuda' and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise EvaluationInputError(f'--device={device}: this machine has {torch.cuda.device_count()} CUDA devices; use cpu'
                                   + (f' or cuda:0 .. cuda:{torch.cuda.device_count() - 1}' if torch.cuda.device_count() else ''))
    if dev.type not in ('cpu', 'cuda'):
        raise EvaluationInputError(f'--device={device} is not supported; use cpu, cuda or cuda:N')
    return dev


def check_npz_pair(ref_npz: str, sample_npz: str, splits: int, k: int) -> None:
    """Both files hold enough images for the metrics: more than k (precision and recall), at least `splits` samples (IS)."""
    for path, what in ((ref_npz, 'reference'), (sample_npz, 'sample')):
        n = npz_shape(path)[0]
        if n <= k:
            raise EvaluationInputError(f'the {what} npz {path} holds {n} images; precision and recall with --k={k} neighbours need '
                                       f'more than {k}: give more images or a --k between 1 and {max(n - 1, 1)}')
        if what == 'sample' and n < splits:
            raise EvaluationInputError(f'--splits={splits} needs at least {splits} samples; {path} holds {n}: use --splits between 1 and {n}')


def read_reference_stats(path: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The FID statistics a reference batch stores beside its images ('mu' (2048,), 'sigma' (2048, 2048)), or None.

    The OpenAI reference batches carry them, computed over the whole reference set (not only the images of arr_0); their
    evaluator takes them for FID, so this does too. Precision and recall use the images of arr_0 either way."""
    with np.load(path, allow_pickle=False) as z:
        names = set(z.files)
        if not names & {'mu', 'sigma'}:
            return None
        if not names >= {'mu', 'sigma'}:
            raise EvaluationInputError(f'{path} holds {"mu" if "mu" in names else "sigma"} without {"sigma" if "mu" in names else "mu"}: '
                                       'FID statistics need both (or neither, to compute them from arr_0)')
        mu, sigma = z['mu'], z['sigma']
    if mu.shape != (2048,) or sigma.shape != (2048, 2048) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluationInputError(f'{path}: mu {mu.shape} and sigma {sigma.shape} must be the finite (2048,) mean and (2048, 2048) '
                                   'covariance of Inception pool features')
    return mu.astype(np.float64), sigma.astype(np.float64)


def evaluate(ref_npz: str, sample_npz: str, inception_weights: Optional[str] = None, bs: int = 100, splits: int = 10, k: int = 3,
             device: Optional[str] = None) -> Dict[str, float]:
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_part
    dev = check_settings(bs, splits, k, device, inception_weights)
    check_npz_pair(ref_npz, sample_npz, splits, k)   # fail on a bad file before loading the network
    ref_stats = read_reference_stats(ref_npz)
    stored = ref_stats is not None
    net = load_inception(inception_weights, dev)
    ref_pool, _ = inception_features(net, ref_npz, bs, dev)
    pool, logits = inception_features(net, sample_npz, bs, dev)
    if ref_stats is None:
        ref_stats = ref_pool.mean(0), np.cov(ref_pool, rowvar=False)
    else:
        logger.info('FID against the mu and sigma stored in %s (as the OpenAI evaluator does), not the %d images of its arr_0',
                    ref_npz, len(ref_pool))
    fid = frechet_distance(pool.mean(0), np.cov(pool, rowvar=False), *ref_stats)
    isc = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=False)
    precision, recall = calculate_precision_recall_part(torch.from_numpy(pool).float(), torch.from_numpy(ref_pool).float(),
                                                        neighborhood=k, batch_size=10000)
    return {'fid': fid, 'inception_score': isc['inception_score_mean'], 'inception_score_std': isc['inception_score_std'],
            'precision': precision, 'recall': recall, 'n_samples': int(len(pool)), 'n_ref': int(len(ref_pool)),
            'fid_reference_stats': 'stored mu/sigma' if stored else 'arr_0'}


def print_sample_manifest(sample_npz: str) -> None:
    """Print how the scored samples were made: the manifest sample.py stores in its npz (settings and weight sha256s)."""
    try:
        manifest = read_npz_manifest(sample_npz)
    except Exception:   # not a readable zip: evaluate() names the problem
        return
    if manifest is None:
        print(f'{sample_npz}: no manifest (not written by sample.py), so nothing says how these samples were made')
        return
    print(f'{sample_npz} was made with: {json.dumps(manifest.get("pixels", manifest), sort_keys=True)}')
    print(f'  ({json.dumps(manifest.get("info", {}), sort_keys=True)})')


@dataclass
class EvaluateArgs:
    """Flags of evaluate.py."""
    ref_npz: str = flag(help='reference batch: arr_0 (N, H, W, 3) uint8, e.g. VIRTUAL_imagenet256_labeled.npz', positional=True)
    sample_npz: str = flag(help='samples: arr_0 (N, H, W, 3) uint8, e.g. the npz written by sample.py', positional=True)
    inception_weights: str = flag('', f"a local copy of {INCEPTION_URL}; '': the download cached in the torch hub folder",
                                  group='model')
    bs: int = flag(100, 'images per Inception batch (>= 1)', group='evaluation')
    splits: int = flag(10, 'Inception Score splits (>= 1)', group='evaluation')
    k: int = flag(3, 'neighbours for precision and recall (>= 1)', group='evaluation')
    device: Optional[str] = flag(None, 'cpu, cuda or cuda:N; None: cuda where available, else cpu', group='environment')
    out_json: str = flag('', "append the metrics as one JSON line to this file (its folder must exist); '': none", group='output')


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    a = parse_dataclass(EvaluateArgs, argv, description=__doc__.splitlines()[0])
    if a.out_json and not os.path.isdir(os.path.dirname(os.path.abspath(a.out_json))):
        raise EvaluationInputError(f'--out_json={a.out_json}: the folder {os.path.dirname(os.path.abspath(a.out_json))} does not exist')
    setup_logging(0)
    print_sample_manifest(a.sample_npz)
    m = evaluate(a.ref_npz, a.sample_npz, a.inception_weights or None, a.bs, a.splits, a.k, a.device)
    print(f'Inception Score: {m["inception_score"]:.4f} (± {m["inception_score_std"]:.4f})')
    print(f'FID: {m["fid"]:.4f}')
    print(f'Precision: {m["precision"]:.4f}')
    print(f'Recall: {m["recall"]:.4f}')
    if a.out_json:
        with open(a.out_json, 'a') as f:
            f.write(json.dumps({'ref': a.ref_npz, 'samples': a.sample_npz, **m}) + '\n')
    return m


if __name__ == '__main__':
    run_main(lambda: main(sys.argv[1:]))
