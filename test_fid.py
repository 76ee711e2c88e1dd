"""Tests for fid.py: closed forms for the Frechet distance, IS, the statistics and FID's average
pool, the TF1 resize against an independent loop (exact in fp64), the Inception key layouts of
both public weight files (from the reference manifest), statistics I/O, one-line errors for every
bad input of the command line. No Inception weights needed. The small-data metric: test_small_metric.py.
Run: python -m pytest -q test_fid.py
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fid

MANIFEST_PATH = Path(__file__).parent / "testdata" / "inception_fid_manifest.json"
MANIFEST = json.loads(MANIFEST_PATH.read_text())
STATE_DICT = MANIFEST["torch_fidelity"]["state_dict"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread inside each test: on a shared, busy machine several times faster here
    (conftest.py restores the count after)."""
    torch.set_num_threads(1)


def released_weights(seed=0):
    """A state dict in the released files' layout (no num_batches_tracked) whose activations
    neither vanish nor explode: He-scaled convs, BatchNorm near identity."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in STATE_DICT.items():
        if key.endswith("num_batches_tracked"):
            continue
        noise = torch.randn(shape, generator=generator)
        if len(shape) == 4:
            state[key] = noise * (2 / np.prod(shape[1:])) ** 0.5
        elif key.endswith(("running_var", "bn.weight")):
            state[key] = 1 + 0.1 * noise
        else:
            state[key] = 0.05 * noise
    return state


@pytest.fixture(scope="session")
def released():
    return released_weights()


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory, released):
    path = tmp_path_factory.mktemp("weights") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(released, path)
    return path


# ---- The network ----
def test_resize_tf1_against_loop():
    x = np.random.default_rng(2).integers(0, 256, size=(1, 2, 5, 7)).astype(np.float64)
    out_size = 11
    expected = np.zeros((1, 2, out_size, out_size))
    for i in range(out_size):
        for j in range(out_size):
            # TF1: source = i * in/out (no half-pixel offset), in float32 as torch-fidelity
            y = np.float32(i) * np.float32(5 / out_size)
            xx = np.float32(j) * np.float32(7 / out_size)
            y0 = int(np.floor(y))
            x0 = int(np.floor(xx))
            y1 = min(y0 + 1, 4)
            x1 = min(x0 + 1, 6)
            dy = float(y - y0)
            dx = float(xx - x0)
            top = x[..., y0, x0] + (x[..., y0, x1] - x[..., y0, x0]) * dx
            bottom = x[..., y1, x0] + (x[..., y1, x1] - x[..., y1, x0]) * dx
            expected[..., i, j] = top + (bottom - top) * dy
    # the exactness proof in fp64
    got = fid.resize_tf1(torch.tensor(x), out_size)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-9)
    # fp32, as the model runs it: three lerps of values <= 255, each a + (b - a) * w with three
    # roundings of at most 255 * 2^-24, and errors of the inputs carried through with weight 1
    got32 = fid.resize_tf1(torch.tensor(x, dtype=torch.float32), out_size)
    np.testing.assert_allclose(got32.numpy(), expected, rtol=0, atol=6 * 255 * 2.0**-24)
    big = torch.randint(0, 256, (1, 3, 32, 32)).float()
    half_pixel = F.interpolate(big, size=299, mode="bilinear")
    assert not torch.allclose(fid.resize_tf1(big), half_pixel, atol=1)
    same = torch.randint(0, 256, (1, 3, 299, 299)).float()
    assert torch.equal(fid.resize_tf1(same), same)


def window_closed_form(x, reduce):
    """reduce over each pixel's 3x3 window clipped to the image: TF's SAME pooling."""
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = reduce(x[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2])
    return out


def pool_block(name):
    """A block with one input channel: A, C, E (Mixed_7b) average, E (Mixed_7c) takes the max."""
    if name == "A":
        return fid.InceptionA(1, pool_features=2)
    if name == "C":
        return fid.InceptionC(1, channels_7x7=2)
    return fid.InceptionE(1, pool=name[2:])


@pytest.mark.parametrize("name", ["A", "C", "E-avg", "E-max"])
def test_pool_branches_leave_padding_out(name):
    """FID's 3x3 average pool divides by the pixels inside the image (count_include_pad=False),
    Mixed_7c's pool is a max: the pool branch against the closed form on a 5x5 input, in fp64."""
    module = pool_block(name).double().eval()  # BatchNorm with its running statistics
    pool = np.max if name == "E-max" else np.mean
    branch = module.branch_pool
    with torch.no_grad():
        branch.conv.weight.fill_(1.0)  # 1x1 conv from the one input channel
        branch.bn.weight.fill_(1.0)
        branch.bn.bias.zero_()
        branch.bn.running_mean.zero_()
        branch.bn.running_var.fill_(1.0)
    x = np.random.default_rng(5).uniform(1, 2, size=(5, 5))  # > 0, so the ReLUs pass it through
    out = module(torch.tensor(x)[None, None])
    channels = branch.conv.out_channels
    expected = window_closed_form(x, pool) / np.sqrt(1 + branch.bn.eps)
    for c in range(channels):
        got = out[0, -channels + c].detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_inception_layout_and_forward():
    torch.manual_seed(0)
    model = fid.InceptionV3()
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(STATE_DICT.items())
    assert sum(p.numel() for p in model.parameters()) == MANIFEST["torch_fidelity"]["n_params"]
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    with torch.no_grad():
        model.fc.bias.fill_(1.0)  # a bias in the IS logits would be 1e5 times the tolerance below
    shapes = []
    model.Mixed_7c.register_forward_hook(lambda module, args, output: shapes.append(output.shape[1:]))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pool, logits = model(images)
    assert tuple(shapes[-1]) == (2048, 8, 8)  # TF's mixed_10 at 299 px, whatever the input
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(pool).all() and pool.abs().sum() > 0
    torch.testing.assert_close(logits, pool @ model.fc.weight.T)  # IS logits carry no bias
    # eval mode, no coupling across the batch. Two correct fp32 implementations differ by
    # <= 1e-6 of max|pool| (inception_facts.md, measured); BatchNorm in training mode by ~1
    alone = model(images[1:])[0]
    assert (alone - pool[1:]).abs().max() <= 1e-4 * pool.abs().max()


def test_load_both_weight_layouts(tmp_path, released, weights_file):
    # the released files (no num_batches_tracked)
    model = fid.load_inception(weights_file, "cpu")
    assert model.has_logits
    assert all(torch.equal(model.state_dict()[k], v) for k, v in released.items())
    # a saved state_dict of pytorch-fid's fid_inception_v3(), with num_batches_tracked
    full_keys = MANIFEST["pytorch_fid"]["fid_inception_v3"]["state_dict"]
    full = {k: released.get(k, torch.tensor(7)) for k in full_keys}
    torch.save(full, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    assert fid.load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth", "cpu").has_logits
    mapping = MANIFEST["pytorch_fid"]["InceptionV3_wrapper"]["block_mapping"]
    inverse = {v: k for k, v in mapping.items()}
    wrapper = {}
    for k, v in released.items():
        head, rest = k.split(".", 1)
        if head != "fc":
            wrapper[f"{inverse[head]}.{rest}"] = v
    wrapper_keys = set(MANIFEST["pytorch_fid"]["InceptionV3_wrapper"]["state_dict"])
    assert set(wrapper) == {k for k in wrapper_keys if not k.endswith("num_batches_tracked")}
    torch.save(wrapper, tmp_path / "wrapper.pth")
    model = fid.load_inception(tmp_path / "wrapper.pth", "cpu")
    assert not model.has_logits
    for k, v in released.items():
        assert k.startswith("fc") or torch.equal(model.state_dict()[k], v)
    # a missing key, a wrong shape, no dict: one-line ValueErrors (corrupt files: BAD_INPUTS)
    del wrapper["blocks.2.4.branch1x1.conv.weight"]
    torch.save(wrapper, tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "shape.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    for name, match in [("missing.pth", r"3 missing keys \['Mixed_6b.branch1x1"), ("shape.pth", "size mismatch"),
                        ("list.pth", "not a state dict")]:
        with pytest.raises(ValueError, match=match) as error:
            fid.load_inception(tmp_path / name, "cpu")
        assert "\n" not in str(error.value)


# ---- Features and statistics ----
class MeanModel(torch.nn.Module):
    """A stand-in for Inception: per-channel means of the uint8 images (cheap), no logits."""
    has_logits = False

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, images):
        return images.float().mean((2, 3)) * self.w, None


def test_statistics_are_unbiased_closed_form():
    """sigma = sum (x - mu)(x - mu)^T / (N - 1), as np.cov and all three FID codes take it."""
    features = np.array([[0, 0, 0], [1, 2, 5], [2, 1, 5], [3, 3, 2]], np.float32)
    mu = np.array([1.5, 1.5, 3.0])
    # by hand: the sums of products of the deviations, divided by N - 1 = 3
    sigma = np.array([[5 / 3, 4 / 3, 1.0], [4 / 3, 5 / 3, 1.0], [1.0, 1.0, 6.0]])
    stats = fid.feature_statistics(features)
    np.testing.assert_allclose(stats["mu"], mu, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=0, atol=1e-12)
    # the same through the pipeline: 1x1 images, whose channel means are the pixels
    images = features.astype(np.uint8).reshape(4, 1, 1, 3)
    stats = fid.compute_statistics(images, MeanModel(), batch_size=3, progress=False)
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=0, atol=1e-12)


def test_statistics_round_trip(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)
    stats = fid.compute_statistics(images, MeanModel(), batch_size=3, progress=False)
    assert stats["mu"].dtype == stats["sigma"].dtype == np.float64
    assert stats["sigma"].shape == (3, 3)
    # the float32 sums of integers < 2^24 are exact: one rounding (2^-24) in the division by N = 7
    np.testing.assert_allclose(stats["mu"], images.reshape(-1, 3).mean(0), rtol=2.0**-23)
    # numpy's rule: the suffix is appended
    assert fid.save_statistics(stats, tmp_path / "ref") == str(tmp_path / "ref.npz")
    back = fid.load_statistics(tmp_path / "ref.npz")
    assert np.array_equal(back["mu"], stats["mu"])
    assert np.array_equal(back["sigma"], stats["sigma"])
    mu32 = stats["mu"].astype(np.float32)
    np.savez(tmp_path / "fork.npz", mu=mu32, sigma=stats["sigma"])  # the fork's dtypes
    fork = fid.load_statistics(tmp_path / "fork.npz")
    assert np.array_equal(fork["mu"], mu32.astype(np.float64))
    # ADM's VIRTUAL_*_labeled.npz layout
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=stats["mu"], sigma=stats["sigma"],
             mu_s=np.zeros(2), sigma_s=np.eye(2))
    assert np.array_equal(fid.load_statistics(tmp_path / "adm.npz")["sigma"], stats["sigma"])
    torch.save({"mu": mu32, "sigma": stats["sigma"]}, tmp_path / "fidelity.pt")
    fidelity = fid.load_statistics(tmp_path / "fidelity.pt")
    assert np.array_equal(fidelity["mu"], mu32.astype(np.float64))
    # no stats: computed from arr_0 as ADM's evaluator does, streamed in batches of 3
    np.savez(tmp_path / "batch.npz", arr_0=images)
    computed = fid.load_statistics(tmp_path / "batch.npz", MeanModel(), batch_size=3)
    assert np.array_equal(computed["mu"], stats["mu"])
    assert np.array_equal(computed["sigma"], stats["sigma"])
    # (N, H, W) grey -> RGB, as convert('RGB')
    np.savez(tmp_path / "grey.npz", arr_0=images[..., 0])
    grey = fid.compute_statistics(tmp_path / "grey.npz", MeanModel(), 3, progress=False)
    assert np.array_equal(grey["mu"], np.full(3, stats["mu"][0]))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    # PNG is lossless
    assert np.array_equal(fid.load_statistics(folder, MeanModel())["sigma"], stats["sigma"])


def test_save_statistics_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ref.npz"
    fid.save_statistics({"mu": np.zeros(2), "sigma": np.eye(2)}, path)
    before = path.read_bytes()

    def broken_savez(file, **arrays):
        Path(file).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        fid.save_statistics({"mu": np.ones(2), "sigma": np.eye(2)}, path)
    assert path.read_bytes() == before


def test_one_line_errors(tmp_path):
    bad = [(np.zeros((2, 3, 8, 5), np.uint8), "shape"), (np.zeros((2, 8, 8, 3), np.float32), "uint8")]
    for images, match in bad:
        with pytest.raises(ValueError, match=match) as error:
            fid.compute_statistics(images, MeanModel())
        assert "\n" not in str(error.value)
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 5), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 8, 5\)"):
        fid.compute_statistics(tmp_path / "nchw.npz", MeanModel())
    with pytest.raises(FileNotFoundError, match="missing.pth: no such file") as error:
        fid.load_inception(tmp_path / "missing.pth")
    assert "\n" not in str(error.value)
    good = tmp_path / "good.npz"
    np.savez(good, mu=np.zeros(3), sigma=np.eye(3))
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[:200])
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage")
    np.savez(tmp_path / "no-sigma.npz", mu=np.zeros(3))
    for name in ["truncated.npz", "garbage.pt", "no-sigma.npz"]:
        with pytest.raises(ValueError, match=f"{name}: not a statistics file") as error:
            fid.load_statistics(tmp_path / name)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no .png"):
        fid.compute_statistics(tmp_path, MeanModel())


# ---- The metrics ----
def closed_form_2x2(mu1, s1, mu2, s2):
    # for 2x2 M = s1 s2 (positive eigenvalues): (sqrt(l1) + sqrt(l2))^2 = tr M + 2 sqrt(det M)
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


@pytest.mark.parametrize("method", ["eigvals", "sqrtm"])
def test_frechet_distance_closed_forms(method):
    rng = np.random.default_rng(0)
    mu1 = rng.normal(size=6)
    mu2 = rng.normal(size=6)
    a = rng.uniform(0.1, 3, 6)
    b = rng.uniform(0.1, 3, 6)
    # diagonal covariances
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method)
    assert got == pytest.approx(expected, abs=1e-10)
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])  # a non-commuting pair
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu1 = np.array([1.1, -2.3])
    mu2 = np.array([0.5, 0.25])
    got = fid.frechet_distance(mu1, s1, mu2, s2, method)
    assert got == pytest.approx(closed_form_2x2(mu1, s1, mu2, s2), abs=1e-12)
    # a float32 mu (the fork's files) is cast to float64, then the distance is taken in float64
    mu32 = mu1.astype(np.float32)
    assert fid.frechet_distance(mu32, s1, mu2, s2, method) == fid.frechet_distance(
        mu32.astype(np.float64), s1, mu2, s2, method)
    full = np.cov(rng.normal(size=(200, 64)), rowvar=False)
    assert abs(fid.frechet_distance(np.zeros(64), full, np.zeros(64), full, method)) < 1e-9
    # rank-deficient covariances (n < d, a small-sample FID) stay finite; eigvals and sqrtm agree
    # to 1.3e-9 relative here (measured over 30 seeds; 2e-10 at d = 2048 in inception_facts.md)
    low1 = np.cov(rng.normal(size=(20, 64)), rowvar=False)
    low2 = np.cov(rng.normal(size=(30, 64)), rowvar=False)
    got = fid.frechet_distance(np.zeros(64), low1, np.ones(64), low2, method)
    other_method = "sqrtm" if method == "eigvals" else "eigvals"
    other = fid.frechet_distance(np.zeros(64), low1, np.ones(64), low2, other_method)
    assert np.isfinite(got) and got == pytest.approx(other, rel=1e-7)


def test_inception_score_constructed_logits():
    n = 1000
    k = 10
    onehot = torch.full((n, fid.NUM_LOGITS), -50.0)
    # each split of 100 holds 10 of each of k classes
    onehot[torch.arange(n), torch.arange(n) % k] = 50.0
    mean, std = fid.inception_score(onehot, shuffle=False)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
    uniform = fid.inception_score(torch.zeros(n, fid.NUM_LOGITS))
    assert uniform[0] == pytest.approx(1.0, abs=1e-12)
    # N % 10 != 0, against an independent numpy version
    logits = np.random.default_rng(1).normal(size=(1003, 50)).astype(np.float32) * 3
    x = logits[np.random.RandomState(2020).permutation(1003)].astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    splits = [p[i * 1003 // 10:(i + 1) * 1003 // 10] for i in range(10)]
    scores = [np.exp(np.mean(np.sum(c * (np.log(c) - np.log(c.mean(0))), 1))) for c in splits]
    expected = (np.mean(scores), np.std(scores))
    assert fid.inception_score(logits) == pytest.approx(expected, rel=1e-9)


# ---- The command line ----
@pytest.fixture(scope="session")
def inputs(tmp_path_factory, weights_file):
    """The files a user has: samples, reference statistics, weights, and bad versions of each."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(6)
    samples = rng.integers(0, 256, size=(4, 24, 24, 3), dtype=np.uint8)
    np.savez(folder / "samples.npz", arr_0=samples)
    np.savez_compressed(folder / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(folder / "ref3.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(folder / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(folder / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    (folder / "weights.pth").symlink_to(weights_file)
    for name, good in [("samples", "samples.npz"), ("ref", "ref.npz"), ("weights", "weights.pth")]:
        with open(folder / good, "rb") as file:
            data = file.read(1 << 16)  # the first 64 KiB of each: truncated
        suffix = Path(good).suffix
        (folder / f"truncated-{name}{suffix}").write_bytes(data[:len(data) // 2])
        (folder / f"garbage-{name}{suffix}").write_bytes(rng.bytes(3000))
    torch.save({"conv.weight": torch.zeros(1)}, folder / "foreign.pth")
    (folder / "empty").mkdir()
    (folder / "folder.npz").mkdir()
    (folder / "a-file").write_text("not a folder")
    # image folders: one PNG that is not an image; two sizes in one batch
    for name, sizes in (("corrupt", (8,)), ("mixed", (8, 16))):
        (folder / name).mkdir()
        for i, size in enumerate(sizes):
            Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(folder / name / f"{i}.png")
    (folder / "corrupt" / "9-bad.png").write_bytes(rng.bytes(300))
    return folder


W = ["--inception", "weights.pth"]
BAD_INPUTS = [  # (argv, what the message must name)
    (["samples.npz", "--ref", "ref.npz", "--batch-size", "0"] + W, "--batch-size"),
    (["samples.npz", "--ref", "ref.npz", "--batch-size", "-3"] + W, "--batch-size"),
    (["samples.npz", "--ref", "ref.npz", "--batch-size", "many"] + W, "--batch-size"),
    (["samples.npz", "--ref", "ref.npz", "--method", "svd"] + W, "--method"),
    (["samples.npz", "--ref", "ref.npz", "--device", "nonsense"] + W, "--device"),
    (["samples.npz", "--ref", "ref.npz", "--device", "cuda:99"] + W, "--device"),
    (["samples.npz"] + W, "--ref"),
    (["missing.npz", "--ref", "ref.npz"] + W, "SAMPLES"),
    (["truncated-samples.npz", "--ref", "ref.npz"] + W, "SAMPLES"),
    (["garbage-samples.npz", "--ref", "ref.npz"] + W, "SAMPLES"),
    (["floats.npz", "--ref", "ref.npz"] + W, "SAMPLES"),
    (["empty", "--ref", "ref.npz"] + W, "SAMPLES"),
    (["one.npz", "--ref", "ref.npz"] + W, "SAMPLES"),
    (["corrupt", "--ref", "ref.npz"] + W, "9-bad.png"),
    (["mixed", "--ref", "ref.npz"] + W, "one size per folder"),
    (["samples.npz", "--ref", "missing.npz"] + W, "--ref"),
    (["samples.npz", "--ref", "truncated-ref.npz"] + W, "--ref"),
    (["samples.npz", "--ref", "garbage-ref.npz"] + W, "--ref"),
    (["samples.npz", "--ref", "garbage-weights.pth"] + W, "--ref"),
    (["samples.npz", "--ref", "ref3.npz"] + W, "--ref"),
    (["samples.npz", "--ref", "ref.npz", "--inception", "missing.pth"], "--inception"),
    (["samples.npz", "--ref", "ref.npz", "--inception", "truncated-weights.pth"], "--inception"),
    (["samples.npz", "--ref", "ref.npz", "--inception", "garbage-weights.pth"], "--inception"),
    (["samples.npz", "--ref", "ref.npz", "--inception", "foreign.pth"], "--inception"),
    (["samples.npz", "--ref", "ref.npz", "--inception", "empty"], "--inception"),
    (["stats", "samples.npz", "--out", "out.npz", "--batch-size", "0"] + W, "--batch-size"),
    (["stats", "missing", "--out", "out.npz"] + W, "SOURCE"),
    (["stats", "garbage-samples.npz", "--out", "out.npz"] + W, "SOURCE"),
    (["stats", "samples.npz", "--out", "samples.npz"] + W, "--out"),
    (["stats", "samples.npz", "--out", "floats.npz"] + W, "--out"),
    (["stats", "samples.npz", "--out", "ref.npz/"] + W, "--out"),
    (["stats", "samples.npz", "--out", "folder.npz"] + W, "--out"),
    (["stats", "samples.npz", "--out", "a-file/out.npz"] + W, "--out"),
    (["stats", "samples.npz", "--out", "out.npz", "--inception", "foreign.pth"], "--inception"),
]


def snapshot(folder):
    """Every file's hash (the linked weights file is the session's, not hashed each time)."""
    files = [path for path in folder.rglob("*") if path.is_file() and not path.is_symlink()]
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


@pytest.mark.parametrize("argv, flag", BAD_INPUTS, ids=[" ".join(argv) for argv, _ in BAD_INPUTS])
def test_cli_bad_inputs(argv, flag, inputs, monkeypatch, capsys):
    monkeypatch.chdir(inputs)
    before = snapshot(inputs)
    with pytest.raises(SystemExit) as exit:
        fid.main(argv)
    output = capsys.readouterr()
    message = output.err.strip().splitlines()[-1]
    assert exit.value.code == 2
    assert "Traceback" not in output.out + output.err
    assert message.startswith(("fid.py: error:", "fid.py stats: error:")) and flag in message
    assert snapshot(inputs) == before


class MeanLogitsModel(torch.nn.Module):
    """A cheap stand-in with logits: per-channel means (3 features) and 4 logits from them."""
    has_logits = True

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, images):
        pool = images.float().mean((2, 3)) / 255
        return pool, self.fc(pool)


def test_cli_end_to_end(tmp_path, weights_file, monkeypatch, capsys):
    """stats of a folder with the network, from sys.argv as a user runs it; then FID and IS of the
    same images in an .npz with a stand-in network (eigvals at d = 2048 take ~20 s)."""
    images = np.random.default_rng(7).integers(0, 256, size=(3, 24, 24, 3), dtype=np.uint8)
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "pngs" / f"{i:02d}.png")
    np.savez(tmp_path / "same.npz", arr_0=images)
    argv = ["stats", "pngs", "--out", "mine", "--batch-size", "2", "--inception", str(weights_file)]
    monkeypatch.setattr(sys, "argv", ["fid.py"] + argv)
    monkeypatch.chdir(tmp_path)
    fid.main()
    assert "mine.npz" in capsys.readouterr().out
    saved = fid.load_statistics(tmp_path / "mine.npz")
    assert saved["mu"].shape == (2048,) and np.isfinite(saved["sigma"]).all()
    torch.manual_seed(0)
    monkeypatch.setattr(fid, "load_inception", lambda path, device: MeanLogitsModel())
    monkeypatch.setattr(fid, "POOL_FEATURES", 3)
    fid.main(["same.npz", "--ref", "pngs", "--batch-size", "2"])
    printed = capsys.readouterr().out
    # the same images on both sides (PNG is lossless): identical statistics, FID = 0 up to the
    # eigvals of a rank-2 product (measured |FID| <= 1.2e-11 over 20 seeds; 4 decimals are printed)
    assert float(printed.split("FID:")[1].split()[0]) == 0 and "(3 samples)" in printed
    assert "IS: n/a" in printed  # 3 samples: fewer than IS's 10 splits
    # an existing statistics file is replaced (only such a file: see BAD_INPUTS)
    fid.main(["stats", "pngs", "--out", "mine.npz"])
    assert fid.load_statistics(tmp_path / "mine.npz")["mu"].shape == (3,)
    np.savez(tmp_path / "twelve.npz", arr_0=np.concatenate([images] * 4))
    fid.main(["twelve.npz", "--ref", "pngs"])
    printed = capsys.readouterr().out
    assert "IS: " in printed and "n/a" not in printed

