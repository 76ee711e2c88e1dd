"""Tests of inpainting (inpaint.py, sample.sample_tokens(known=...)) and of sampling without
labels: known tokens are kept bit-exact (also with another unknown count in each row), t0 = 1 is
the plain sampler bit for bit, start_time inverts every mask schedule, the reveal counts and the
CFG steps follow the schedule started at t0, regions map to the right tokens (pixel patches,
16 px latents), labels=None is the fake class embedding without CFG, class names label the grid
rows, and the command line writes its grid and turns each bad input into a one-line error.
Run: python -m pytest -q test_inpaint.py"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import emigm
import inpaint
import sample
import tokenizer

TINY = dict(seq_len=49, token_channels=16, width=32, depth=1, num_heads=2, head_depth=1,
            head_width=32, num_classes=10, buffer_size=4, attn_dropout=0.0, proj_dropout=0.0)
FAST = dict(num_iter=4, cfg=2.0, cfg_schedule="linear", cfg_interval=(0.05, 0.6),
            head_steps=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed, **config):
    """A model from `seed` (the global RNG of the other tests untouched), every weight moved by
    N(0, 0.05^2): the head's zero-initialised output layers would hide the class embedding."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = emigm.EMIGM(**config).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def tiny():
    return seeded(0, **TINY)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def record_passes(model, monkeypatch):
    """(batch size, masked count of row 0) of every transformer pass; asserts one masked count
    per pass (the MAE encoder needs it)."""
    passes = []
    encoder = model.forward_encoder

    def forward_encoder(x, m, c):
        assert len(set(m.sum(1).tolist())) == 1
        passes.append((len(x), int(m[0].sum())))
        return encoder(x, m, c)

    monkeypatch.setattr(model, "forward_encoder", forward_encoder)
    return passes


def reference_sample_tokens(model, labels, num_iter, cfg, cfg_schedule, cfg_interval,
                            head_steps, generator):
    """sample_tokens before labels=None and inpainting (commit 84c9209), with its schedules
    written out: times linspace(1, 1e-5, K + 1)."""
    B = len(labels)
    L = model.seq_len
    times = torch.linspace(1, sample.SAMPLER_EPS, num_iter + 1)
    gamma = emigm.mask_ratio(times, model.mask_schedule)
    reveal_share = 1 - gamma[1:] / gamma[:-1]
    reveal_share[-1] = 1.0
    s = times[1:]
    guided = ((s > cfg_interval[0]) & (s <= cfg_interval[1]) & (cfg != 1.0)).tolist()
    tokens = torch.zeros(B, L, model.token_channels)
    mask = torch.ones(B, L, dtype=torch.bool)
    class_emb = model.class_emb(labels)
    # the kernels of sample_tokens: prepacked weights (another kernel at 1-row calls)
    with cli.packed_weights(model):
        for k in range(num_iter):
            if not mask[0].any():
                break
            reveal = sample.choose_reveal(mask, reveal_share[k].item(), generator)
            scale = cfg
            if cfg_schedule != "constant":
                u = 1 - (mask[0].sum() - reveal[0].sum()).item() / L
                scale = sample.cfg_scale(cfg, cfg_schedule, u)
            tokens = sample.predict_revealed(model, tokens, mask, reveal, class_emb, cfg=scale,
                                             guided=guided[k], head_steps=head_steps,
                                             generator=generator)
            mask = mask & ~reveal
    return tokens


def random_known(B, L, C, unknown_counts, seed=0):
    """Known tokens ~ N(0, 1); row i has unknown_counts[i] unknown positions, drawn at random."""
    g = gen(seed)
    tokens = torch.randn(B, L, C, generator=g)
    order = torch.rand(B, L, generator=g).argsort(1)
    mask = torch.ones(B, L, dtype=torch.bool)
    for i, n in enumerate(unknown_counts):
        mask[i, order[i, :n]] = False
    return sample.Known(tokens, mask)


def test_t0_one_is_the_plain_sampler_bit_for_bit(tiny):
    """No known tokens (known=None, or a known-mask of all False: t0 = 1) reproduce the sampler
    as it was before this change, bit for bit, with CFG on some steps and a linear CFG schedule."""
    labels = torch.tensor([3, 1, 4])
    want = reference_sample_tokens(tiny, labels, generator=gen(5), **FAST)
    assert torch.equal(sample.sample_tokens(tiny, labels, generator=gen(5), **FAST), want)
    nothing = sample.Known(torch.randn(3, 49, 16), torch.zeros(3, 49, dtype=torch.bool))
    got = sample.sample_tokens(tiny, labels, generator=gen(5), known=nothing, **FAST)
    assert torch.equal(got, want)
    assert sample.start_time(1.0, "exp") == 1.0
    assert torch.equal(sample.reveal_schedule(4)[0], torch.linspace(1, sample.SAMPLER_EPS, 5))


def test_known_tokens_are_kept_exactly_with_per_row_counts(tiny, monkeypatch):
    """Rows with different unknown counts (0, 1, 10, 10, 30, 49) run in groups of equal count
    (record_passes asserts it); every known token comes back bit-exact, every unknown one new."""
    known = random_known(6, 49, 16, [10, 0, 30, 10, 49, 1])
    passes = record_passes(tiny, monkeypatch)
    out = sample.sample_tokens(tiny, torch.arange(6), generator=gen(1), known=known, **FAST)
    assert torch.equal(out[known.mask], known.tokens[known.mask])
    assert (out[~known.mask] != known.tokens[~known.mask]).all()
    # groups of 1 row (counts 1, 30, 49) and 2 rows (10), doubled on CFG steps
    assert {b for b, _ in passes} <= {1, 2, 4}
    # the group that runs first (count 1) alone: the same draws, the same tokens
    first = sample.Known(known.tokens[5:], known.mask[5:])
    alone = sample.sample_tokens(tiny, torch.tensor([5]), generator=gen(1), known=first, **FAST)
    assert torch.equal(out[5:], alone)


@pytest.mark.parametrize("schedule", emigm.SCHEDULES)
def test_start_time_inverts_the_mask_schedule(schedule):
    """gamma(t0) = the unknown share (fp32 gamma: within 1e-6), t0 in (0, 1); 1 for shares at or
    above gamma(1), which is 1 - e^-5 < 1 for exp."""
    gamma_1 = emigm.mask_ratio(1.0, schedule).item()
    for share in (1 / 49, 0.1, 0.3, 0.5, 24 / 49, 0.9, 0.99, 0.995, 1.0):
        t0 = sample.start_time(share, schedule)
        if share >= gamma_1:
            assert t0 == 1.0
        else:
            assert 0 < t0 < 1, (share, t0)
            assert abs(emigm.mask_ratio(t0, schedule).item() - share) <= 1e-6, (share, t0)
    assert (sample.start_time(0.995, schedule) == 1.0) == (schedule == "exp")


@pytest.mark.parametrize("schedule,unknown", [("exp", 24), ("cosine", 12)])
def test_reveals_and_cfg_follow_the_schedule_from_t0(monkeypatch, schedule, unknown):
    """From t0 = start_time(n / L): the first pass sees exactly the n unknown tokens, CFG runs on
    the steps whose next time s on linspace(t0, 1e-5, K + 1) is in the interval, and each step
    reveals max(Bin(m, p_k), 1) of the m still unknown, p_k = 1 - gamma(t_k+1) / gamma(t_k):
    the sum of (revealed - its mean) over 60 runs is within 4 standard deviations of 0. From
    t = 1 instead the first step reveals ~10x fewer (exp: p_0 = 0.017 instead of 0.19)."""
    model = seeded(0, **dict(TINY, mask_schedule=schedule))
    L = model.seq_len
    K = 4
    interval = (0.02, 0.08)
    t0 = sample.start_time(unknown / L, schedule)
    p = sample.reveal_schedule(K, schedule, t0)[1].tolist()
    guided = sample.cfg_steps(K, 2.0, interval, t0).tolist()
    assert 0 < sum(guided) < K  # the interval splits these steps
    passes = record_passes(model, monkeypatch)
    deviation = 0.0
    variance = 0.0
    for seed in range(60):
        passes.clear()
        known = random_known(2, L, 16, [unknown, unknown], seed)
        sample.sample_tokens(model, torch.arange(2), K, 2.0, "constant", interval, head_steps=1,
                             generator=gen(seed), known=known)
        masked = [m for _, m in passes] + [0]
        assert masked[0] == unknown
        assert [b for b, _ in passes] == [4 if g else 2 for g in guided][:len(passes)]
        for k in range(len(passes)):
            m = masked[k]
            q0 = (1 - p[k]) ** m  # P(Bin = 0): one token instead
            mean = m * p[k] + q0
            second = m * p[k] * (1 - p[k]) + (m * p[k]) ** 2 + q0
            deviation += masked[k] - masked[k + 1] - mean
            variance += second - mean ** 2
    assert abs(deviation) <= 4 * math.sqrt(variance), (deviation, math.sqrt(variance))


def test_labels_none_is_the_fake_class_without_cfg(tiny, monkeypatch):
    """labels=None: every row gets the fake class embedding and no CFG (cfg and its interval are
    ignored): bit-equal to a model whose class embeddings are all the fake one, at cfg 1."""
    fake = seeded(0, **TINY)
    fake.class_emb.weight.data[:] = fake.fake_latent.data
    want = sample.sample_tokens(fake, torch.tensor([0, 7, 2]), 4, 1.0, "constant", (0.0, 1.0),
                                head_steps=2, generator=gen(3))
    passes = record_passes(tiny, monkeypatch)
    got = sample.sample_tokens(tiny, None, 4, 3.0, "constant", (0.0, 1.0), head_steps=2,
                               generator=gen(3), num_images=3)
    assert torch.equal(got, want)
    assert {b for b, _ in passes} == {3}  # never the doubled CFG batch
    known = random_known(3, 49, 16, [20, 20, 5])
    out = sample.sample_tokens(tiny, None, generator=gen(0), known=known, **FAST)
    assert torch.equal(out[known.mask], known.tokens[known.mask])
    unconditional = seeded(0, **dict(TINY, num_classes=1, label_drop_prob=1.0))
    assert sample.is_unconditional(unconditional) and not sample.is_unconditional(tiny)


def test_region_to_token_mask():
    """28 px in 4 px patches (7 x 7 tokens): a token is unknown if any of its pixels is, in
    tokenizer.patchify's order. 256 px in 16 px latents (16 x 16 tokens): the same rule."""
    rows = np.arange(49) // 7
    cols = np.arange(49) % 7
    want = {"bottom": rows >= 3, "top": rows <= 3, "left": cols <= 3, "right": cols >= 3,
            "center": (rows >= 1) & (rows <= 5) & (cols >= 1) & (cols <= 5),
            "border": ~((rows >= 2) & (rows <= 4) & (cols >= 2) & (cols <= 4))}
    assert set(want) == set(inpaint.REGIONS)
    tok = tokenizer.PixelTokenizer(patch=4, img_size=28)
    for region, expected in want.items():
        pixels = inpaint.region_mask(region, 28)
        got = inpaint.token_mask(pixels, 4)
        assert got.tolist() == expected.tolist(), region
        # the tokenizer's own order: a token holds a region pixel iff it is unknown
        tokens = tok.encode(torch.from_numpy(pixels).float()[None, None], sample=False)
        assert (tokens[0] > 0).any(1).tolist() == expected.tolist(), region
        assert inpaint.pixels_of(got, 4)[pixels].all()  # the grey area covers the region
    latents = inpaint.token_mask(inpaint.region_mask("bottom", 256), 16)
    assert latents.tolist() == [i >= 128 for i in range(256)]
    one_pixel = np.zeros((256, 256), dtype=bool)
    one_pixel[17, 33] = True  # latent row 1, column 2
    assert inpaint.token_mask(one_pixel, 16).nonzero()[:, 0].tolist() == [1 * 16 + 2]


def test_vae_tokens_are_the_posterior_mean():
    """VAE images are encoded with the posterior mean (no sampling noise): twice the same
    tokens, the mode x scale, one token per 16 px latent."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = tokenizer.KL16VAE(ch=32, ch_mult=(1, 1, 1, 1, 1)).eval()
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    tokens = inpaint.encode(vae, images, "cpu")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode_latent(x, sample=False) * vae.scale  # (2, 16, 2, 2)
    assert tokens.shape == (2, 4, 16)
    assert torch.equal(tokens, inpaint.encode(vae, images, "cpu"))
    assert torch.equal(tokens, mean.flatten(2).transpose(1, 2))


def save(model, path, data=None):
    checkpoint = {"model": model.state_dict(), "ema": model.state_dict(), "config": model.config}
    if data is not None:
        checkpoint["data"] = data
    torch.save(checkpoint, path)


def run_flags(d, *flags):
    return ["--ckpt", f"{d}/tiny.pt", "--nfe", "2", "--head-steps", "1", "--cfg", "2",
            "--cfg-schedule", "constant", "--cfg-interval", "0", "1", *flags]


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """A folder with a tiny checkpoint, images of every kind and masks."""
    d = tmp_path_factory.mktemp("inpaint")
    save(tiny, d / "tiny.pt")
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    np.savez(d / "images.npz", arr_0=grey.repeat(3, axis=-1), arr_1=np.array([0, 1, 2, 3, 9]))
    np.savez(d / "nolabels.npz", arr_0=grey)
    np.savez(d / "badlabels.npz", arr_0=grey, arr_1=np.array([0, 1, 2, 3, 10]))
    np.savez(d / "big.npz", arr_0=big, arr_1=np.zeros(2))
    np.savez(d / "float.npz", arr_0=grey.astype(np.float32), arr_1=np.zeros(5))
    np.savez(d / "rgb.npz", arr_0=rgb, arr_1=np.zeros(2))
    (d / "junk.npz").write_bytes(b"not an npz")
    for name, size, white in (("mask", 28, True), ("mask_small", 16, True), ("black", 28, False)):
        mask = np.zeros((size, size), np.uint8)
        mask[:, :4] = 255 if white else 0  # the left column of tokens
        Image.fromarray(mask).save(d / f"{name}.png")
    (d / "grid.png").write_bytes(b"an earlier grid")
    return d


def read_png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def grid_parts(picture, rows, columns, size):
    """A grid PNG -> (its left margin (H, m, 3), the images (rows, columns, size, size, 3))."""
    margin = picture.shape[1] - columns * size
    body = picture[:, margin:].reshape(rows, size, columns, size, 3).transpose(0, 2, 1, 3, 4)
    return picture[:, :margin], body


def named_rows(margin, rows, size):
    """Whether every row's band of the margin holds dark (text) pixels."""
    return (margin < 128).any(axis=(1, 2)).reshape(rows, size).any(1).all()


def test_inpaint_command_line(files, tmp_path, capsys):
    """--inpaint writes one grid of three named rows (original, masked, completed); the
    completions keep every known pixel exactly (pixel tokens round-trip), the masked row is grey
    on the unknown tokens only, and a mask image works as a region does."""
    grid = tmp_path / "inpainted.png"
    sample.main(run_flags(files, "--inpaint", f"{files}/images.npz", "--region", "bottom",
                          "--per-class", "4", "--grid", str(grid)))
    out = capsys.readouterr().out
    assert "28 of 49 tokens unknown" in out and "rows original, masked, completed" in out
    margin, body = grid_parts(read_png(grid), 3, 4, 28)
    assert margin.shape[1] > 20 and named_rows(margin, 3, 28)
    with np.load(files / "images.npz") as f:
        originals = f["arr_0"][:4]
    assert np.array_equal(body[0], originals)
    assert (body[1][:, 12:] == inpaint.GREY).all()  # token rows 3-6 unknown
    assert np.array_equal(body[1][:, :12], originals[:, :12])
    assert np.array_equal(body[2][:, :12], originals[:, :12])
    assert not np.array_equal(body[2][:, 12:], originals[:, 12:])
    # a mask image: its white columns 0-3 are the unknown tokens
    sample.main(run_flags(files, "--inpaint", f"{files}/images.npz", "--mask-image",
                          f"{files}/mask.png", "--unconditional", "--grid", str(grid)))
    assert "7 of 49 tokens unknown" in capsys.readouterr().out
    body = grid_parts(read_png(grid), 3, 5, 28)[1]
    assert np.array_equal(body[2][:, :, 4:], body[0][:, :, 4:])


def test_grids_of_named_classes_unconditional_and_rgb(tmp_path, capsys):
    """A checkpoint with train.py's 'data' (32 px RGB in 4 px patches, class names): the pixel
    tokenizer is built from it and the rows carry the names; --inpaint works on RGB; an
    unconditional model's grid is one block of per_class x per_class images, without CFG, and
    --classes is an error for it."""
    rgb = dict(TINY, seq_len=64, token_channels=48, num_classes=2)
    data = dict(tokenizer="pixel", img_size=32, patch=4, channels=3, class_names=["cat", "dog"])
    save(seeded(0, **rgb), tmp_path / "tiny.pt", data)
    assert sample.load_model(tmp_path / "tiny.pt")[2] == data
    sample.main(run_flags(tmp_path, "--per-class", "3", "--grid", str(tmp_path / "named.png")))
    named = read_png(tmp_path / "named.png")
    margin = grid_parts(named, 2, 3, 32)[0]
    assert named.shape[0] == 2 * 32 and margin.shape[1] > 10 and named_rows(margin, 2, 32)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", arr_0=images, arr_1=np.array([0, 1, 1]))
    sample.main(run_flags(tmp_path, "--inpaint", str(tmp_path / "rgb.npz"), "--region", "center",
                          "--grid", str(tmp_path / "rgb.png")))
    body = grid_parts(read_png(tmp_path / "rgb.png"), 3, 3, 32)[1]
    assert np.array_equal(body[2][:, :8], images[:, :8])  # the top token row is known
    with pytest.raises(SystemExit):  # the Fashion-MNIST metric takes 28 x 28 grey images only
        sample.main(run_flags(tmp_path, "--inpaint", str(tmp_path / "rgb.npz"), "--fid-ref",
                              "fashion-mnist", "--grid", str(tmp_path / "no.png")))
    assert "--fid-ref fashion-mnist" in capsys.readouterr().err
    # an unconditional model: one block, no names, no CFG, no --classes
    uncond = dict(rgb, num_classes=1, label_drop_prob=1.0)
    save(seeded(1, **uncond), tmp_path / "tiny.pt", dict(data, class_names=None))
    sample.main(run_flags(tmp_path, "--per-class", "2", "--grid", str(tmp_path / "block.png")))
    assert read_png(tmp_path / "block.png").shape == (64, 64, 3)
    assert "NFE = 2 x 1.0000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sample.main(run_flags(tmp_path, "--classes", "0", "--grid", str(tmp_path / "no.png")))
    assert "--classes" in capsys.readouterr().err and not (tmp_path / "no.png").exists()


def test_write_grid_without_names_is_the_plain_picture(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 4, 3), dtype=np.uint8)
    sample.write_grid(images, tmp_path / "g.png")
    assert np.array_equal(read_png(tmp_path / "g.png"), images.swapaxes(1, 2).reshape(10, 12, 3))


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


BASE = "--inpaint {d}/images.npz --grid {d}/grid.png"
# (flags after BASE, or after only --grid when they start with "!"; what the message must name)
BAD_INPUTS = [
    ("--region nope", "--region"), ("--region bottom --mask-image {d}/mask.png", "--region"),
    ("--mask-image {d}/missing.png", "--mask-image"),
    ("--mask-image {d}/mask_small.png", "--mask-image"),
    ("--mask-image {d}/black.png", "--mask-image"), ("--inpaint {d}/missing.npz", "--inpaint"),
    ("--inpaint {d}/junk.npz", "--inpaint"), ("--inpaint {d}/big.npz", "--inpaint"),
    ("--inpaint {d}/float.npz", "--inpaint"), ("--inpaint {d}/nolabels.npz", "--unconditional"),
    ("--inpaint {d}/badlabels.npz", "--inpaint"), ("--inpaint {d}/rgb.npz", "--inpaint"),
    ("--out {d}/out", "--out"), ("--num-images 6", "--num-images"),
    ("--num-images 0", "--num-images"), ("--classes 1", "--classes"),
    ("--fid-ref {d}/missing.npz", "--fid-ref"), ("--grid {d}/missing/grid.png", "--grid"),
    ("!--region bottom", "--region"), ("!--mask-image {d}/mask.png", "--mask-image"),
    ("!--unconditional --classes 1", "--classes"),
]


@pytest.mark.parametrize("flags,needle", BAD_INPUTS)
def test_bad_inputs_are_one_line_errors(files, capsys, flags, needle):
    """Exit status 2, no traceback, a last line that names the flag, no file written or
    changed."""
    extra = BASE + " " + flags
    if flags.startswith("!"):
        extra = flags[1:] + " --grid {d}/grid.png"
    before = snapshot(files)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(run_flags(files, *extra.format(d=files).split()))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: " in last and needle in last, err
    assert snapshot(files) == before
