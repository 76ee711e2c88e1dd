"""Tests of data.py through train.py: your own images in small synthetic ImageFolder trees made
here (class folders and flat folders, 32 px PNGs, a few images each). Listing in torchvision's
order, pixels read exactly, training a few steps, the checkpoint's "data" (class names that
survive a resume), unconditional runs (num_classes 1, label_drop_prob 1.0), and one-line errors
for bad folders and flags. Tiny models, fp32 on CPU.
Run: python -m pytest -q test_data.py
"""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import emigm
import sample
import tokenizer
import train

# A few-thousand-parameter model on the small-images preset (train.SMALL) and a short run.
TINY = ["--width", "32", "--depth", "1", "--num-heads", "2", "--head-depth", "1",
        "--head-width", "32", "--buffer-size", "2", "--global-batch-size", "4",
        "--log-every", "1", "--num-iter", "2", "--grid-per-class", "2", "--eval-samples", "8"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread inside each test (conftest.py restores the count after)."""
    torch.set_num_threads(1)


def write_images(folder, count, size=(32, 32), mode="RGB", seed=0):
    """`count` PNGs of random pixels into folder -> their arrays, in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(count):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(array, mode).save(folder / f"{i:03d}.png")
        arrays.append(array)
    return arrays


def class_tree(root, classes=("bag", "shoe"), count=4, mode="RGB"):
    for c, name in enumerate(classes):
        write_images(root / name, count, mode=mode, seed=c)
    return root


def train_main(data_path, out, *flags):
    train.main(["--data-path", str(data_path), "--results-dir", str(out), *TINY,
                "--metric-cache", str(out.parent / "metric.pt"), *flags])
    return torch.load(out / "last.pt", weights_only=True)  # plain data


def snapshot(folder):
    return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def test_listing_and_pixels_match_torchvision_and_the_files(tmp_path):
    """Class folders in sorted order, files walked as tokenizer.ImageFolder (torchvision) does,
    nested folders included; the pixels in memory are the PNGs' own bytes (no resize at the
    images' own size); the 256 px path's dataset reads what tokenizer.ImageFolder reads."""
    root = tmp_path / "tree"
    shoe = write_images(root / "shoe", 3, seed=1)
    bag = write_images(root / "bag", 2, seed=2)
    nested = write_images(root / "bag" / "more", 1, seed=3)
    found = data.find_images(root)
    assert found["classes"] == ["bag", "shoe"]
    assert found["samples"] == tokenizer.ImageFolder(root).samples
    assert [label for _, label in found["samples"]] == [0, 0, 0, 1, 1, 1]
    loaded = data.load_folder(root)
    assert loaded["images"].shape == (6, 32, 32, 3) and loaded["images"].dtype == np.uint8
    assert np.array_equal(loaded["images"], np.stack(bag + nested + shoe))
    files = data.ImageFiles(found["samples"], 16)
    reference = tokenizer.ImageFolder(root, 16)
    for i in range(len(files)):
        assert torch.equal(files[i][0], reference[i][0]) and files[i][1] == reference[i][1]


def test_tokens_hold_the_pixels_exactly(tmp_path):
    """A batch through to_tokens (no flips) and back through the tokenizer's decode gives the
    PNGs' bytes: 4x4 patches of 3 channels, 64 tokens of 48 values."""
    root = class_tree(tmp_path / "tree")
    argv = ["--data-path", str(root), "--no-flip", "--results-dir", str(tmp_path / "out")]
    args = train.check_args(train.build_parser(argv).parse_args(argv), 1)
    train_data = data.build_data(args, data.describe(args), None, "cpu")
    images, labels = train_data.dataset.tensors  # (8, 32, 32, 3) uint8, (8,)
    tokens = train_data.to_tokens(images, "cpu")
    assert tokens.shape == (8, 64, 48) and labels.tolist() == [0] * 4 + [1] * 4
    decoded = (train_data.tokenizer.decode(tokens) + 1) * 127.5  # (8, 3, 32, 32)
    assert torch.equal(decoded.round().byte().permute(0, 2, 3, 1), images)
    assert train_data.labelled["images"].shape == (8, 32, 32, 3)  # the small metric's data


def test_grey_flat_and_resized_folders(tmp_path):
    """Mode-L images give 1 channel; a flat folder has no classes; --img-size resizes and
    center-crops mixed sizes (ADM's crop)."""
    grey = write_images(tmp_path / "grey", 3, mode="L")
    loaded = data.load_folder(tmp_path / "grey")
    assert loaded["class_names"] is None and loaded["images"].shape == (3, 32, 32)
    assert np.array_equal(loaded["images"], np.stack(grey))
    write_images(tmp_path / "mixed" / "a", 2, size=(48, 40))
    write_images(tmp_path / "mixed" / "b", 2, size=(64, 64))
    loaded = data.load_folder(tmp_path / "mixed", img_size=16)
    assert loaded["images"].shape == (4, 16, 16, 3)
    image = Image.open(tmp_path / "mixed" / "a" / "000.png")
    assert np.array_equal(loaded["images"][0], tokenizer.center_crop_arr(image, 16))


def test_class_folder_trains_and_its_names_survive_a_resume(tmp_path):
    """A 2-class tree of 32 px RGB PNGs: pixel tokens 4x4 (64 tokens of 48), 2 classes; the
    checkpoint's data entry; a resume continues with the same names; another folder is refused."""
    root = class_tree(tmp_path / "tree")
    checkpoint = train_main(root, tmp_path / "run", "--max-steps", "2")
    entry = dict(tokenizer="pixel", img_size=32, patch=4, channels=3, class_names=["bag", "shoe"])
    assert checkpoint["data"] == entry
    config = checkpoint["config"]
    assert (config["seq_len"], config["token_channels"], config["num_classes"]) == (64, 48, 2)
    assert config["label_drop_prob"] == 0.1  # conditional: the paper's label dropout
    assert checkpoint["args"]["img_size"] == 32 and checkpoint["step"] == 2
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "data: 8 images of 2 classes" in log and "4x4 pixel patches (64 tokens of 48)" in log
    assert "conditional accuracy" in log  # the small-data metric, on the folder's labels
    # two rows of 2 images, the class names in a left margin
    width, height = Image.open(tmp_path / "run" / "grid_0000002.png").size
    assert height == 2 * 32 and width > 2 * 32
    resumed = train_main(root, tmp_path / "run", "--max-steps", "3", "--resume",
                         str(tmp_path / "run" / "last.pt"))
    assert resumed["step"] == 3 and resumed["data"] == entry


def test_unconditional_runs(tmp_path):
    """A flat folder, and --unconditional on a class tree: num_classes 1, label_drop_prob 1.0
    (every label drops to the fake class), no class names; the log says the labels are
    ignored; the grid has grid-per-class rows."""
    write_images(tmp_path / "flat", 8, mode="L")
    flat = train_main(tmp_path / "flat", tmp_path / "flat_run", "--max-steps", "1")
    assert flat["config"]["num_classes"] == 1 and flat["config"]["label_drop_prob"] == 1.0
    assert flat["data"] == dict(tokenizer="pixel", img_size=32, patch=8, channels=1,
                                class_names=None)
    assert Image.open(tmp_path / "flat_run" / "grid_0000001.png").size == (2 * 32, 2 * 32)
    root = class_tree(tmp_path / "tree")
    run = train_main(root, tmp_path / "run", "--max-steps", "1", "--unconditional")
    assert data.is_unconditional(run["config"]) and run["data"]["class_names"] is None
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "--unconditional: its labels are ignored" in log
    assert "small-data Frechet distance" in log and "accuracy" not in log


def test_unconditional_evaluation_samples_without_labels(monkeypatch, tmp_path):
    """train.evaluate on an unconditional model takes sample.py's labels=None path (the fake
    class embedding, no CFG) for its grid and its metric's samples."""
    model = emigm.EMIGM(seq_len=4, token_channels=3, width=8, depth=1, num_heads=2,
                        head_depth=1, head_width=8, buffer_size=1, **data.UNCONDITIONAL).eval()
    seen = []
    real = sample.sample_tokens

    def recording(model, labels=None, **kwargs):
        seen.append(labels)
        return real(model, labels, **kwargs)

    monkeypatch.setattr(sample, "sample_tokens", recording)
    tok = tokenizer.PixelTokenizer(patch=1, img_size=2, in_channels=3)

    class Metric:
        def evaluate(self, images, labels):
            assert labels is None and images.shape == (5, 2, 2, 3)
            return dict(frechet=1.0)

    kwargs = dict(num_iter=2, cfg=3.0, cfg_interval=(0.0, 1.0), head_steps=2)
    train.evaluate(model, tok, kwargs, tmp_path / "grid.png", 0, per_class=2, metric=Metric(),
                   num_samples=5, log=print)
    assert seen and all(labels is None for labels in seen)
    assert (tmp_path / "grid.png").exists()


def test_num_classes_of_random_data(tmp_path):
    argv = ["--dataset", "random", "--size", "Tiny", "--num-classes", "3",
            "--results-dir", str(tmp_path)]
    args = train.check_args(train.build_parser(argv).parse_args(argv), 1)
    spec = data.describe(args)
    assert train.model_overrides(args, spec)["num_classes"] == 3
    assert spec.checkpoint_entry()["class_names"] is None


def test_data_py_writes_the_folder_as_an_npz(tmp_path, capsys):
    root = class_tree(tmp_path / "tree", mode="L")
    data.main(["--data-path", str(root), "--out", str(tmp_path / "ref")])
    with np.load(tmp_path / "ref.npz") as npz:
        assert npz["arr_0"].shape == (8, 32, 32, 1) and list(npz["arr_1"]) == [0] * 4 + [1] * 4
    assert "labels 0-1: bag, shoe" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--data-path", str(root), "--out", str(tmp_path / "ref.npz")])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err


def make_folder(kind, root):
    """Bad folders by name: a folder with each problem."""
    if kind == "empty":
        root.mkdir()
    elif kind == "no-images":
        root.mkdir()
        (root / "notes.txt").write_text("no images here")
    elif kind == "empty-class":
        class_tree(root)
        (root / "hat").mkdir()
    elif kind == "mixed":
        write_images(root / "a", 2, size=(32, 32))
        write_images(root / "b", 2, size=(28, 28))
    elif kind == "not-square":
        write_images(root, 2, size=(32, 24))
    elif kind == "both":
        class_tree(root)
        write_images(root, 1)
    elif kind == "broken":
        class_tree(root)
        (root / "bag" / "zz.png").write_bytes(b"not a png")
    else:
        class_tree(root)
    return root


# (the folder, flags, text the one-line error must contain)
BAD_INPUTS = [
    ("missing", ["--data-path", "{missing}"], "--data-path"),
    ("empty", [], "--data-path {root} holds no images"),
    ("no-images", [], "--data-path {root} holds no images"),
    ("empty-class", [], "the class folder 'hat' holds no images"),
    ("mixed", [], "images have mixed sizes (28x28, 32x32): pass --img-size N"),
    ("not-square", [], "--img-size N"),
    ("both", [], "--data-path {root} has images both in it"),
    ("broken", [], "zz.png is not a readable image"),
    ("tree", ["--num-classes", "3"], "--num-classes 3: {root} has 2 class folders"),
    ("tree", ["--unconditional", "--num-classes", "2"], "--num-classes 2"),
    ("tree", ["--unconditional", "--label-drop-prob", "0.5"], "--label-drop-prob"),
    ("tree", ["--img-size", "128"], "--img-size 128"),
    ("tree", ["--patch", "5"], "--patch 5 does not divide --img-size 32"),
    ("tree", ["--size", "XS"], "--size XS --img-size 32"),
    ("tree", ["--dataset", "random", "--img-size", "100"], "--img-size 100: 256 or 512"),
    ("tree", ["--resume", "{other_run}/last.pt"],
     "--resume {other_run}/last.pt was trained on the classes ['cat', 'dog']"),
]


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    """A finished run on other classes (the same model): resuming it here is refused."""
    tmp_path = tmp_path_factory.mktemp("other")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = class_tree(tmp_path / "tree", classes=("cat", "dog"))
    train_main(root, tmp_path / "run", "--max-steps", "1", "--eval-samples", "4")
    torch.set_num_threads(threads)
    return tmp_path / "run"


@pytest.mark.parametrize("kind, flags, text", BAD_INPUTS,
                         ids=[f"{kind} {' '.join(flags)}" for kind, flags, _ in BAD_INPUTS])
def test_bad_input_is_a_one_line_error(kind, flags, text, other_run, tmp_path, capsys):
    """Exit status 2, no traceback, the flag named in one line; the run resumed and the
    fresh results folder unchanged."""
    root = make_folder(kind, tmp_path / "images") if kind != "missing" else tmp_path / "no"
    paths = dict(root=root, missing=tmp_path / "missing", other_run=other_run)
    before = snapshot(other_run)
    fresh = tmp_path / "fresh"
    argv = ["--data-path", str(root), "--results-dir", str(fresh), *TINY,
            *(flag.format(**paths) for flag in flags)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and text.format(**paths) in lines[0], lines
    assert snapshot(other_run) == before
    assert not fresh.exists() or not any(fresh.iterdir())
