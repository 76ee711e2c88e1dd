"""Tests for small_metric.py: the thread-count context, and a cheap run of the small-data metric on
separable synthetic digits (accuracy, baselines, the cache: reloaded, its key and format unchanged since
fid.py held the class, a foreign file refused and kept).
Run: python -m pytest -q test_small_metric.py
"""
import hashlib

import numpy as np
import pytest
import torch

import small_metric


@pytest.fixture(autouse=True)
def one_thread():
    """One thread inside each test: on a shared, busy machine several times faster here
    (conftest.py restores the count after)."""
    torch.set_num_threads(1)


def synthetic_digits(n, rng):
    """10 classes of 28x28 uint8 images: class c a bright bar at rows 2c + 4, 2c + 5, over noise."""
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, size=(n, 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 * c + 4:2 * c + 6, 4:24] = 220
    return images.astype(np.uint8), labels


def test_num_threads_restores():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with small_metric.num_threads(2):
            assert torch.get_num_threads() == 2
            raise RuntimeError("inside")
    assert torch.get_num_threads() == threads
    with small_metric.num_threads(None):
        assert torch.get_num_threads() == threads
    assert torch.get_num_threads() == threads


def test_small_data_metric(tmp_path):
    rng = np.random.default_rng(4)
    train, train_labels = synthetic_digits(640, rng)
    test, test_labels = synthetic_digits(200, rng)
    cache = str(tmp_path / "c.pt")
    threads = torch.get_num_threads()
    metric = small_metric.SmallDataMetric(train, train_labels, cache, epochs=2, batch_size=64, verbose=False)
    assert torch.get_num_threads() == threads  # the caller's thread setting comes back
    result = metric.evaluate(test, test_labels)
    # the bars are separable: 1.0 measured (1 and 2 threads); chance is 0.1
    assert result["accuracy"] > 0.9 and result["frechet"] >= 0
    base = metric.baselines(test, test_labels)
    assert base["classifier_accuracy"] == result["accuracy"]
    assert base["real_test"] == result["frechet"]
    # measured: blur3x3 = 57 x real_test; floor > 0, as the two halves of the test set differ
    assert base["blur3x3"] > 2 * base["real_test"] and base["floor"] > 0
    wrong_labels = (test_labels[:100] + 1) % 10
    assert metric.evaluate(test[:100], wrong_labels)["accuracy"] < 0.2
    cached = small_metric.SmallDataMetric(train, train_labels, cache, epochs=2, batch_size=64, verbose=False)
    assert cached.train_seconds == metric.train_seconds
    assert cached.evaluate(test) == {"frechet": result["frechet"]}
    # the cache as fid.SmallDataMetric wrote it (old caches load): its fields, and the key written
    # out here from the recipe, the shape and the data
    saved = torch.load(cache, weights_only=True)
    assert sorted(saved) == ["key", "model", "mu", "sigma", "train_seconds"]
    recipe = [("batch_size", 64), ("epochs", 2), ("lr", 2e-3), ("seed", 0)]
    header = repr(("SmallClassifier v1", recipe, (640, 28, 28))).encode()
    data = train.tobytes() + train_labels.astype(np.int64).tobytes()
    assert saved["key"] == hashlib.sha256(header + data).hexdigest()
    with pytest.raises(ValueError, match="labels"):
        small_metric.SmallDataMetric(train, train_labels[:-1], cache)
    # a file at cache_path that is not such a cache is an error, and stays as it was
    for name, content in [("model.pt", None), ("garbage.pt", b"\x80\x02garbage")]:
        path = tmp_path / name
        if content is None:
            torch.save({"model": {}}, path)
        else:
            path.write_bytes(content)
        before = path.read_bytes()
        with pytest.raises(ValueError, match=name):
            small_metric.SmallDataMetric(train, train_labels, str(path), epochs=1, verbose=False)
        assert path.read_bytes() == before
