"""Tests for small_metric.py: the thread-count context, and cheap runs of the small-data
metric on separable synthetic digits (accuracy, baselines, the cache: reloaded, its key and
format, a foreign file refused and kept), on 32 px RGB data (a cache file per data set) and
on data sorted by class; its command line (a folder of PNGs, bad inputs).
Run: python -m pytest -q test_small_metric.py
"""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

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
    # the 2x2 blur is milder than the 3x3 one, and still far from the real images
    assert base["blur3x3"] > base["blur2x2"] > 2 * base["real_test"]
    wrong_labels = (test_labels[:100] + 1) % 10
    assert metric.evaluate(test[:100], wrong_labels)["accuracy"] < 0.2
    cached = small_metric.SmallDataMetric(train, train_labels, cache, epochs=2, batch_size=64, verbose=False)
    assert cached.train_seconds == metric.train_seconds
    assert cached.evaluate(test) == {"frechet": result["frechet"]}
    # the cache's fields, and the key written out here from the version, the recipe, the shape
    # and the data (the fields as fid.SmallDataMetric wrote them; v2: statistics in eval mode)
    saved = torch.load(cache, weights_only=True)
    assert sorted(saved) == ["key", "model", "mu", "sigma", "train_seconds"]
    recipe = [("batch_size", 64), ("epochs", 2), ("lr", 2e-3), ("seed", 0)]
    header = repr(("SmallClassifier v2", recipe, (640, 28, 28))).encode()
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


def colour_bars(n, rng, size=32):
    """3 classes of RGB images: class c a bar in channel c at a random row, over dim noise."""
    labels = np.arange(n) % 3
    images = rng.integers(0, 60, size=(n, size, size, 3))
    for i, c in enumerate(labels):
        row = rng.integers(2, size - 4)
        images[i, row:row + 3, 4:size - 4, c] = 230
    return images.astype(np.uint8), labels


def test_rgb_data_and_a_cache_file_per_data_set(tmp_path, monkeypatch):
    """32 px RGB, 3 classes: the colour is the class (accuracy ~1); with no cache path each data set
    gets its own file: the same data loads it, changed data (one pixel) trains its own."""
    monkeypatch.setattr(small_metric, "CACHE_DIR", tmp_path)
    rng = np.random.default_rng(0)
    train, labels = colour_bars(300, rng)
    test, test_labels = colour_bars(90, rng)
    recipe = dict(epochs=2, batch_size=32, verbose=False)
    metric = small_metric.SmallDataMetric(train, labels, **recipe)
    assert metric.evaluate(test, test_labels)["accuracy"] > 0.9
    assert metric.net.convs[0].in_channels == 3 and metric.cache_path.startswith(str(tmp_path))
    again = small_metric.SmallDataMetric(train, labels, **recipe)
    assert again.cache_path == metric.cache_path and again.train_seconds == metric.train_seconds
    changed = train.copy()
    changed[0, 0, 0, 0] += 1
    other = small_metric.SmallDataMetric(changed, labels, **recipe)
    assert other.cache_path != metric.cache_path and len(list(tmp_path.glob("*.pt"))) == 2
    # grey samples are repeated into RGB; samples of another size are refused
    assert "frechet" in metric.evaluate(test[..., 0])
    with pytest.raises(ValueError, match="the size it was trained on"):
        metric.evaluate(test[:, :28, :28])
    base = metric.baselines(test, test_labels)
    assert base["blur3x3"] > base["real_test"]


def test_statistics_do_not_depend_on_the_order_of_the_data(tmp_path):
    """Data sorted by class (as a folder is read): the train split's statistics are taken with
    BatchNorm in eval mode, as evaluate() sees images, so the train split's own FD is ~0 (in
    train mode, on batch statistics of one class each, it was 50-90 here)."""
    rng = np.random.default_rng(1)
    train, labels = colour_bars(600, rng)
    order = np.argsort(labels, kind="stable")
    metric = small_metric.SmallDataMetric(train[order], labels[order], str(tmp_path / "c.pt"),
                                          epochs=1, batch_size=64, verbose=False)
    assert abs(metric.evaluate(train)["frechet"]) < 1e-3
    grey_metric = small_metric.SmallDataMetric(train[..., 0], labels, str(tmp_path / "g.pt"),
                                               epochs=1, batch_size=64, verbose=False)
    with pytest.raises(ValueError, match="colour"):
        grey_metric.evaluate(train)  # colour samples against grey data


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A folder of two classes of 32 px RGB PNGs, and samples .npz files against it."""
    root = tmp_path_factory.mktemp("metric")
    images, labels = colour_bars(60, np.random.default_rng(2))
    for i, (image, label) in enumerate(zip(images, labels)):
        (root / "data" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "data" / f"c{label}" / f"{i:03d}.png")
    np.savez(root / "samples.npz", arr_0=images[:30], arr_1=labels[:30])
    np.savez(root / "big_labels.npz", arr_0=images[:30], arr_1=labels[:30] + 5)
    np.savez(root / "small.npz", arr_0=images[:30, :16, :16], arr_1=labels[:30])
    (root / "flat").mkdir()
    Image.fromarray(images[0]).save(root / "flat" / "a.png")
    return root


def test_command_line(folders, tmp_path, capsys):
    small_metric.main(["--data-path", str(folders / "data"), "--samples",
                       str(folders / "samples.npz"), "--cache", str(tmp_path / "c.pt")])
    out = capsys.readouterr().out
    assert "samples          FD" in out and "accuracy" in out
    assert "c2 " in out and "(0.33)" in out  # the classes seen, beside the data's shares


BAD_INPUTS = [
    (["--data-path", "{root}/missing", "--samples", "{root}/samples.npz"], "--data-path"),
    (["--data-path", "{root}/flat", "--samples", "{root}/samples.npz"], "--data-path"),
    (["--data-path", "{root}/data", "--samples", "{root}/missing.npz"], "--samples"),
    (["--data-path", "{root}/data", "--samples", "{root}/data/c0/000.png"], "--samples"),
    (["--data-path", "{root}/data", "--samples", "{root}/small.npz"], "--samples"),
    (["--data-path", "{root}/data", "--samples", "{root}/big_labels.npz"], "--unconditional"),
    (["--data-path", "{root}/samples.npz", "--samples", "{root}/samples.npz", "--img-size", "32"],
     "--img-size"),
    (["--data-path", "{root}/data", "--samples", "{root}/samples.npz", "--img-size", "0"],
     "--img-size"),
]


@pytest.mark.parametrize("flags, flag", BAD_INPUTS, ids=[" ".join(f[1::2]) for f, _ in BAD_INPUTS])
def test_bad_input_is_a_one_line_error(flags, flag, folders, tmp_path, capsys):
    argv = [text.format(root=folders) for text in flags] + ["--cache", str(tmp_path / "c.pt")]
    with pytest.raises(SystemExit) as exit_info:
        small_metric.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in captured.out + captured.err
    assert "error:" in lines[-1] and flag in lines[-1], captured.err
