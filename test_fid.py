"""Tests for fid.py: closed forms for the Frechet distance and IS, the TF1 resize against an independent loop, the
Inception key layouts of both public weight files (built from the reference manifest), statistics I/O, one-line
errors, and a cheap run of the small-data metric. No Inception weights are needed. Run: python -m pytest -q test_fid.py
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fid

MANIFEST = json.loads((Path(__file__).parent / 'testdata' / 'inception_fid_manifest.json').read_text())


@pytest.fixture(autouse=True)
def one_thread():
    with fid.num_threads(1):   # on a shared, busy machine one thread is several times faster here (see fid.py)
        yield


def closed_form_2x2(mu1, s1, mu2, s2):
    # for 2x2 M = s1 s2 (positive eigenvalues): (sqrt(l1) + sqrt(l2))^2 = tr M + 2 sqrt(det M)
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


@pytest.mark.parametrize('method', ['eigvals', 'sqrtm'])
def test_frechet_distance_closed_forms(method):
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)   # diagonal covariances
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method) == pytest.approx(expected, abs=1e-10)
    s1, s2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[0.5, -0.3], [-0.3, 1.5]])   # a non-commuting pair
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    got = fid.frechet_distance(mu1, s1, mu2, s2, method)
    assert got == pytest.approx(closed_form_2x2(mu1, s1, mu2, s2), abs=1e-12)
    # a float32 mu (the fork's files) is cast; identical stats give ~0; rank-deficient covariances (n < d) stay finite
    assert fid.frechet_distance(mu1.astype(np.float32), s1, mu2, s2, method) == pytest.approx(got, rel=1e-6)
    full = np.cov(rng.normal(size=(200, 64)), rowvar=False)
    assert abs(fid.frechet_distance(np.zeros(64), full, np.zeros(64), full, method)) < 1e-9
    low1, low2 = (np.cov(rng.normal(size=(n, 64)), rowvar=False) for n in (20, 30))   # rank 19 and 29 of 64
    got = fid.frechet_distance(np.zeros(64), low1, np.ones(64), low2, method)
    assert np.isfinite(got) and got == pytest.approx(fid.frechet_distance(np.zeros(64), low1, np.ones(64), low2,
                                                                          'sqrtm' if method == 'eigvals' else method))


def test_inception_score_constructed_logits():
    n, k = 1000, 10
    onehot = torch.full((n, fid.NUM_LOGITS), -50.0)
    onehot[torch.arange(n), torch.arange(n) % k] = 50.0     # each split of 100 holds 10 of each of k classes
    mean, std = fid.inception_score(onehot, shuffle=False)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    assert fid.inception_score(torch.zeros(n, fid.NUM_LOGITS))[0] == pytest.approx(1.0)
    logits = np.random.default_rng(1).normal(size=(1003, 50)).astype(np.float32) * 3   # N not divisible by 10
    x = logits[np.random.RandomState(2020).permutation(1003)].astype(np.float64)      # independent numpy version
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(c * (np.log(c) - np.log(c.mean(0))), 1))) for c in
              (p[i * 1003 // 10:(i + 1) * 1003 // 10] for i in range(10))]
    assert fid.inception_score(logits) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)


def test_resize_tf1_against_loop():
    x = np.random.default_rng(2).integers(0, 256, size=(1, 2, 5, 7)).astype(np.float64)
    out_size = 11
    expected = np.zeros((1, 2, out_size, out_size))
    for i in range(out_size):          # src = i * in / out, no half-pixel offset; clamp the upper neighbour
        for j in range(out_size):
            y, xx = i * 5 / out_size, j * 7 / out_size
            y0, x0 = int(np.floor(y)), int(np.floor(xx))
            y1, x1, dy, dx = min(y0 + 1, 4), min(x0 + 1, 6), y - y0, xx - x0
            top = x[..., y0, x0] * (1 - dx) + x[..., y0, x1] * dx
            bottom = x[..., y1, x0] * (1 - dx) + x[..., y1, x1] * dx
            expected[..., i, j] = top * (1 - dy) + bottom * dy
    got = fid.resize_tf1(torch.tensor(x, dtype=torch.float32), out_size)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)
    big = torch.randint(0, 256, (1, 3, 32, 32)).float()
    assert not torch.allclose(fid.resize_tf1(big), F.interpolate(big, size=299, mode='bilinear'), atol=1)
    same = torch.randint(0, 256, (1, 3, 299, 299)).float()
    assert torch.equal(fid.resize_tf1(same), same)


def test_inception_layout_and_forward():
    torch.manual_seed(0)
    model = fid.InceptionV3()
    manifest = MANIFEST['torch_fidelity']['state_dict']
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(manifest.items())
    assert sum(p.numel() for p in model.parameters()) == MANIFEST['torch_fidelity']['n_params']
    shapes = []
    model.Mixed_7c.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape[1:])))
    for size, batch in ((32, 2), (299, 1)):
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        pool, logits = model(images)
        assert shapes[-1] == (2048, 8, 8)                                  # TF's mixed_10 at 299 px, whatever the input
        assert pool.shape == (batch, 2048) and logits.shape == (batch, 1008)
        assert torch.isfinite(pool).all() and pool.abs().sum() > 0
        torch.testing.assert_close(logits, pool @ model.fc.weight.T)     # IS logits carry no bias
        if batch > 1:                                                     # eval mode: no coupling across the batch
            torch.testing.assert_close(model(images[1:])[0], pool[1:], atol=1e-5, rtol=1e-4)


def test_load_both_weight_layouts(tmp_path):
    released = {k: torch.full(v, float(i % 97 + 1)) for i, (k, v) in
                enumerate(MANIFEST['torch_fidelity']['state_dict'].items()) if not k.endswith('num_batches_tracked')}
    torch.save(released, tmp_path / 'weights-inception-2015-12-05-6726825d.pth')   # no num_batches_tracked
    model = fid.load_inception(tmp_path / 'weights-inception-2015-12-05-6726825d.pth', 'cpu')
    assert model.has_logits and all(torch.equal(model.state_dict()[k], v) for k, v in released.items())
    full = {k: torch.tensor(7) if k.endswith('num_batches_tracked') else torch.full(v, 0.5)   # a saved state_dict of
            for k, v in MANIFEST['pytorch_fid']['fid_inception_v3']['state_dict'].items()}   # pytorch-fid's model
    torch.save(full, tmp_path / 'pt_inception-2015-12-05-6726825d.pth')
    assert fid.load_inception(tmp_path / 'pt_inception-2015-12-05-6726825d.pth', 'cpu').has_logits
    inverse = {v: k for k, v in MANIFEST['pytorch_fid']['InceptionV3_wrapper']['block_mapping'].items()}
    wrapper = {}
    for k, v in released.items():
        head, rest = k.split('.', 1)
        if head != 'fc':
            wrapper[f'{inverse[head]}.{rest}'] = v
    wrapper_keys = set(MANIFEST['pytorch_fid']['InceptionV3_wrapper']['state_dict'])
    assert set(wrapper) == {k for k in wrapper_keys if not k.endswith('num_batches_tracked')}
    torch.save(wrapper, tmp_path / 'wrapper.pth')
    model = fid.load_inception(tmp_path / 'wrapper.pth', 'cpu')
    assert not model.has_logits
    assert all(torch.equal(model.state_dict()[k], v) for k, v in released.items() if not k.startswith('fc'))
    del released['Mixed_6b.branch1x1.conv.weight']
    torch.save(released, tmp_path / 'broken.pth')
    with pytest.raises(ValueError, match='1 missing keys') as error:
        fid.load_inception(tmp_path / 'broken.pth')
    assert '\n' not in str(error.value)


class MeanModel(torch.nn.Module):
    """A stand-in for Inception: per-channel means of the uint8 images (cheap), no logits."""
    has_logits = False

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, images):
        return images.float().mean((2, 3)) * self.w, None


def test_statistics_round_trip(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
    stats = fid.compute_statistics(images, MeanModel(), batch_size=3, progress=False)
    assert stats['mu'].dtype == stats['sigma'].dtype == np.float64 and stats['sigma'].shape == (3, 3)
    np.testing.assert_allclose(stats['mu'], images.reshape(-1, 3).mean(0), rtol=1e-6)
    fid.save_statistics(stats, tmp_path / 'ref.npz')
    back = fid.load_statistics(tmp_path / 'ref.npz')
    assert np.array_equal(back['mu'], stats['mu']) and np.array_equal(back['sigma'], stats['sigma'])
    np.savez(tmp_path / 'fork.npz', mu=stats['mu'].astype(np.float32), sigma=stats['sigma'])   # the fork's dtypes
    assert fid.load_statistics(tmp_path / 'fork.npz')['mu'].dtype == np.float64
    np.savez(tmp_path / 'adm.npz', arr_0=images, mu=stats['mu'], sigma=stats['sigma'], mu_s=np.zeros(2),
             sigma_s=np.eye(2))   # ADM's VIRTUAL_*_labeled.npz layout
    assert np.array_equal(fid.load_statistics(tmp_path / 'adm.npz')['sigma'], stats['sigma'])
    torch.save({'mu': stats['mu'].astype(np.float32), 'sigma': stats['sigma']}, tmp_path / 'fidelity.pt')
    assert np.allclose(fid.load_statistics(tmp_path / 'fidelity.pt')['mu'], stats['mu'])
    np.savez(tmp_path / 'batch.npz', arr_0=images)     # no stats: computed from arr_0, as ADM's evaluator does
    computed = fid.load_statistics(tmp_path / 'batch.npz', MeanModel(), batch_size=3)   # streamed in batches of 3
    np.testing.assert_allclose(computed['mu'], stats['mu'])
    np.savez(tmp_path / 'grey.npz', arr_0=images[..., 0])   # (N, H, W) grey -> RGB, as PIL's convert('RGB')
    assert np.allclose(fid.compute_statistics(tmp_path / 'grey.npz', MeanModel(), 3, progress=False)['mu'],
                       stats['mu'][0])
    folder = tmp_path / 'pngs'
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f'{i:03d}.png')
    np.testing.assert_allclose(fid.load_statistics(folder, MeanModel())['sigma'], stats['sigma'], rtol=1e-6)


def test_one_line_errors(tmp_path):
    bad = [(np.zeros((2, 3, 8, 5), np.uint8), 'shape'), (np.full((2, 8, 8, 3), np.nan), 'NaN'),
           (np.zeros((2, 8, 8, 3), np.float32), 'uint8')]
    for images, match in bad:
        with pytest.raises(ValueError, match=match) as error:
            fid.compute_statistics(images, MeanModel())
        assert '\n' not in str(error.value)
    np.savez(tmp_path / 'nchw.npz', arr_0=np.zeros((2, 3, 8, 5), np.uint8))
    with pytest.raises(ValueError, match=r'got shape \(2, 3, 8, 5\)'):
        fid.compute_statistics(tmp_path / 'nchw.npz', MeanModel())
    with pytest.raises(FileNotFoundError, match='Inception weights not found') as error:
        fid.load_inception(tmp_path / 'missing.pth')
    assert '\n' not in str(error.value)
    np.savez(tmp_path / 's.npz', arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    run = subprocess.run([sys.executable, str(Path(fid.__file__)), str(tmp_path / 's.npz'), '--ref', 'r.npz',
                          '--inception', str(tmp_path / 'missing.pth')], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.startswith('fid.py: error: Inception weights not found')
    assert len(run.stderr.strip().splitlines()) == 1


def synthetic_digits(n, rng):
    """10 classes of 28x28 uint8 images: class c is a bright bar at rows 2c + 4, 2c + 5, over noise."""
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 * c + 4:2 * c + 6, 4:24] = 220
    return images.astype(np.uint8), labels


def test_small_data_metric(tmp_path):
    rng = np.random.default_rng(4)
    (train, train_labels), (test, test_labels) = synthetic_digits(640, rng), synthetic_digits(200, rng)
    threads = torch.get_num_threads()
    metric = fid.SmallDataMetric(train, train_labels, str(tmp_path / 'c.pt'), epochs=2, batch_size=64, verbose=False)
    assert torch.get_num_threads() == threads                       # the caller's thread setting comes back
    result = metric.evaluate(test, test_labels)
    assert result['accuracy'] > 0.9 and result['frechet'] >= 0
    base = metric.baselines(test, test_labels)
    assert base['classifier_accuracy'] == result['accuracy'] and base['real_test'] == result['frechet']
    assert base['blur3x3'] > base['real_test'] and base['floor'] > 0
    assert metric.evaluate(test[:100], (test_labels[:100] + 1) % 10)['accuracy'] < 0.2   # wrong labels
    cached = fid.SmallDataMetric(train, train_labels, str(tmp_path / 'c.pt'), epochs=2, batch_size=64, verbose=False)
    assert cached.train_seconds == metric.train_seconds and cached.evaluate(test) == {'frechet': result['frechet']}
    with pytest.raises(ValueError, match='labels'):
        fid.SmallDataMetric(train, train_labels[:-1], str(tmp_path / 'c.pt'))
