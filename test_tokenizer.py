"""Tests for tokenizer.py: the KL-16 VAE equals MAR's (reference vectors: exact in fp64,
within fp32 rounding in fp32), the key layout of kl16.ckpt, strict loading with one-line
errors, exact pixel round trip, DC-AE through diffusers, the latent cache (its command
line, its ranks, its bad inputs) and Fashion-MNIST loading.
Run: python -m pytest -q test_tokenizer.py"""
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tokenizer as T

DATA = Path(__file__).parent / "testdata"
# fp32 comparisons: a result computed in fp32 is compared with the exact (fp64) result, and
# may be off by MARGIN times the reference code's own fp32 error on the same inputs
# (measured in each test from the reference file: MAR's fp32 against the exact result), or
# by MARGIN fp32 ulps where that is larger. fp32 rounding in another summation order (thread
# count, oneDNN or not, another CPU or conv algorithm) has that size: on the machine that
# wrote this, ours was 0.5-0.7 x MAR's own error with 1 and 2 threads, with and without
# oneDNN. Real bugs are far above the bound: GroupNorm eps 1e-5 instead of 1e-6 gives 72 x
# MAR's error on encode (1.8e-4, vae_facts.md), half precision in one activation 130-175 x
# (4.4e-4 on encode, 1.0e-3 on decode), bfloat16 there 900 x (measured with this file's
# data).
MARGIN = 8.0
FP32_ULP = 2.0 ** -23


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def fp32_bound(reference_fp32, exact):
    """MARGIN x the reference code's own fp32 error on these inputs (at least 1 ulp)."""
    return MARGIN * max(rel_err(reference_fp32, exact), FP32_ULP)


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and len(message) > 20, message
    return message


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: 1 thread is as fast, and far faster when the 2 cores are shared (2
    OpenMP threads then stall: 75 s instead of 33 s for this file).
    test_kl16_fp32_within_rounding runs with 1 and with 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




@pytest.fixture(scope="module")
def ref():
    return torch.load(DATA / "vae_tiny_reference.pt", weights_only=True)


def reference_state_dict(ref):
    return {k: ref["weights_offset"][k] + ref["weights_scale"][k] * ref["weights_q"][k].float() for k in ref["keys"]}


@pytest.fixture(scope="module")
def tiny_vae(ref):
    vae = T.KL16VAE(ch=ref["config"]["ch"])
    vae.load_state_dict(reference_state_dict(ref), strict=True)
    return vae.eval()


def vae_outputs(vae, x, z):
    with torch.no_grad():
        moments = vae.encode_moments(x)
        posterior = T.DiagonalGaussianDistribution(moments)
        return {"moments": moments, "mean": posterior.mean, "logvar": posterior.logvar, "std": posterior.std,
                "decode_z": vae.decode_latent(z), "decode_mean": vae.decode_latent(posterior.mean)}


# ------------------------------------------------------------------------------------------
# KL-16 VAE
# ------------------------------------------------------------------------------------------
def posterior_closed_form(parameters):
    """MAR's DiagonalGaussianDistribution written out (vae_facts.md), in float64: mean,
    logvar, std, var, kl."""
    p = parameters.double()
    mean = p[:, :p.shape[1] // 2]
    logvar = p[:, p.shape[1] // 2:].clamp(-30.0, 20.0)
    var = torch.exp(logvar)
    kl = 0.5 * torch.sum(mean ** 2 + var - 1.0 - logvar, dim=[1, 2, 3])
    return {"mean": mean, "logvar": logvar, "std": torch.exp(0.5 * logvar), "var": var, "kl": kl}


@pytest.fixture(scope="module")
def exact(ref, tiny_vae):
    """The exact outputs, none taken from the code under test alone: MAR's float64
    moments and decode_z; mean, logvar and std from those moments in closed form;
    decode_mean by our float64 decoder on that mean (the decoder that
    test_kl16_fp64_equals_mar proves equal to MAR's)."""
    moments = ref["outputs_fp64"]["moments"]
    posterior = posterior_closed_form(moments)
    vae64 = T.KL16VAE(ch=ref["config"]["ch"]).double()
    vae64.load_state_dict(tiny_vae.state_dict())
    with torch.no_grad():
        decode_mean = vae64.decode_latent(posterior["mean"])
    return {"moments": moments, "mean": posterior["mean"], "logvar": posterior["logvar"], "std": posterior["std"],
            "decode_z": ref["outputs_fp64"]["decode_z"], "decode_mean": decode_mean}


def test_kl16_fp64_equals_mar(ref, tiny_vae, exact):
    """The proof is fp64: our float64 VAE equals MAR's float64 run to <= 1e-9 (measured:
    1e-15 on encode, 1e-14 on decode), on any CPU."""
    vae64 = T.KL16VAE(ch=ref["config"]["ch"]).double()
    vae64.load_state_dict(tiny_vae.state_dict())
    ours = vae_outputs(vae64, ref["inputs"]["x"].double(), ref["inputs"]["z"].double())
    errors = {k: rel_err(ours[k], exact[k]) for k in ours}
    print("fp64 rel err vs MAR's fp64:", errors)
    assert max(errors.values()) <= 1e-9, errors


@pytest.mark.parametrize("threads", [1, 2])
def test_kl16_fp32_within_rounding(ref, tiny_vae, exact, threads):
    """fp32: each output is within fp32_bound of the exact result, i.e. MARGIN x MAR's
    own fp32 error on the same inputs (measured here from the reference file: 2.5e-6 on
    the moments, 7.9e-6 on decode_z, 1.4e-5 on decode_mean), so our fp32 and MAR's fp32
    differ by at most (MARGIN + 1) x that error, whatever the CPU's summation order (the
    thread count changes it; the fixture restores the count)."""
    torch.set_num_threads(threads)
    ours = vae_outputs(tiny_vae, ref["inputs"]["x"], ref["inputs"]["z"])
    for k, value in ours.items():
        assert value.dtype == torch.float32
        mar = ref["outputs"][k]
        print(f"{k}: fp32 rel err {rel_err(value, exact[k]):.2e}, MAR's own {rel_err(mar, exact[k]):.2e}")
        assert rel_err(value, exact[k]) <= fp32_bound(mar, exact[k]), k
        assert rel_err(value, mar) <= fp32_bound(mar, exact[k]) * (MARGIN + 1) / MARGIN, k


def test_diagonal_gaussian_reference(ref):
    """mean, logvar (clamped) and mode are exact; std, var and kl are exp and sums in
    fp32: each within fp32_bound of the closed form in fp64 (MAR's own fp32 error there:
    2e-8 to 6e-8, below one ulp)."""
    case = ref["diagonal_gaussian"]
    d = T.DiagonalGaussianDistribution(case["parameters"])
    for k in ("mean", "logvar"):
        assert torch.equal(getattr(d, k), case[k]), k
    assert torch.equal(d.mode(), case["mode"])
    assert torch.equal(d.parameters, case["parameters"])  # unclamped, as cached
    exact = posterior_closed_form(case["parameters"])
    got = {"std": d.std, "var": d.var, "kl": d.kl()}
    for k in got:
        assert rel_err(got[k], exact[k]) <= fp32_bound(case[k], exact[k]), k
    eps = torch.randn(d.mean.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d.sample(torch.Generator().manual_seed(0)), d.mean + d.std * eps)


def test_kl16_key_layout_is_the_manifest(ref):
    manifest = json.loads((DATA / "vae_manifest.json").read_text())
    with torch.device("meta"):
        vae = T.KL16VAE()  # full size, no memory
    shapes = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert shapes == manifest["state_dict"]
    assert list(shapes) == ref["keys"]  # same order as MAR's module too
    assert sum(p.numel() for p in vae.parameters()) == manifest["n_params"] == 66456019
    assert not list(vae.buffers())
    assert (vae.channels, vae.stride, vae.seq_len(256)) == (16, 16, 256)
    assert T.KL16_SCALE == manifest["latent_scale_factor"] == 0.2325


def test_kl16_interface(ref, tiny_vae):
    """Exact identities, no tolerance: tokens are the mean x 0.2325 in row-major order,
    decode divides by 0.2325 and decodes, and (m x 0.2325) / 0.2325 is m to within two
    fp32 roundings."""
    x = ref["inputs"]["x"]
    with torch.no_grad():
        mean = tiny_vae.encode_moments(x)[:, :16]
        tokens = tiny_vae.encode(x, sample=False)
        assert tokens.shape == (2, 16, 16)  # 64px / 16 = 4x4 tokens of 16 channels
        assert torch.equal(tokens[:, 6], mean[:, :, 1, 2] * T.KL16_SCALE)  # row-major (h, w): not (w, h)
        assert torch.equal(tiny_vae.decode(tokens), tiny_vae.decode_latent(T.unpatchify(tokens) / T.KL16_SCALE))
        back = T.unpatchify(tokens) / T.KL16_SCALE
        assert ((back - mean).abs() <= FP32_ULP * mean.abs()).all()
        a = tiny_vae.encode(x, generator=torch.Generator().manual_seed(1))
        b = tiny_vae.encode(x, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        assert not torch.equal(a, tokens)
    with pytest.raises(ValueError) as e:
        tiny_vae.encode(torch.zeros(1, 1, 64, 64))
    one_line(e)


def test_kl16_loads_from_path_strictly(ref, tiny_vae, tmp_path):
    sd = reference_state_dict(ref)
    torch.save({"model": sd, "epoch": 3}, tmp_path / "kl16.ckpt")
    vae = T.load_tokenizer("kl16", tmp_path / "kl16.ckpt")
    assert isinstance(vae, T.KL16VAE)
    assert not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    with torch.no_grad():
        assert torch.equal(vae.encode_moments(ref["inputs"]["x"]), tiny_vae.encode_moments(ref["inputs"]["x"]))
    with pytest.raises(FileNotFoundError) as e:
        T.load_tokenizer("kl16", tmp_path / "nope.ckpt")
    assert "kl16.ckpt" in one_line(e)
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    whole = (tmp_path / "kl16.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(whole[:len(whole) // 2])
    bad = {"emigm": {"model": {"class_emb.weight": torch.zeros(2, 2)}},
           "missing": {"model": {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}},
           "extra": {"model": dict(sd, **{"encoder.extra.weight": torch.zeros(1)})},
           "shape": {"model": dict(sd, **{"decoder.conv_out.bias": torch.zeros(4)})}}
    for name, ckpt in bad.items():
        torch.save(ckpt, tmp_path / f"{name}.ckpt")
    for name in ["garbage", "truncated", *bad]:
        with pytest.raises(ValueError) as e:
            T.load_tokenizer("kl16", tmp_path / f"{name}.ckpt")
        assert one_line(e).startswith("--vae "), name
    with pytest.raises(ValueError) as e:
        T.load_tokenizer("kl16")
    assert "--vae" in one_line(e)


# ------------------------------------------------------------------------------------------
# Pixel tokenizer and DC-AE
# ------------------------------------------------------------------------------------------
def test_pixel_tokenizer_round_trip_is_exact():
    tok = T.load_tokenizer("pixel", patch=4, img_size=28, in_channels=1)
    assert (tok.channels, tok.stride, tok.seq_len(28)) == (16, 4, 49)
    x = torch.randint(0, 256, (3, 1, 28, 28)).float() / 127.5 - 1
    tokens = tok.encode(x)
    assert tokens.shape == (3, 49, 16)
    assert torch.equal(tokens[:, 0], x[:, 0, :4, :4].reshape(3, 16) * tok.scale)  # token 0 = top-left patch
    assert torch.equal(tokens[:, 9], x[:, 0, 4:8, 8:12].reshape(3, 16) * tok.scale)  # row-major: (1, 2) is token 9
    assert torch.equal(tok.decode(tokens), x)
    with pytest.raises(ValueError) as e:
        T.PixelTokenizer(patch=3)
    one_line(e)
    y = torch.randn(2, 3, 8, 8)
    rgb = T.PixelTokenizer(patch=2, img_size=8, in_channels=3)
    assert rgb.encode(y).shape == (2, 16, 12)
    assert torch.equal(rgb.decode(rgb.encode(y)), y)


def tiny_dcae():
    from diffusers import AutoencoderDC
    torch.manual_seed(0)  # the fixture restores the global RNG
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                         encoder_block_types=("ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                         encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                         downsample_block_type="conv", upsample_block_type="interpolate").eval()


def test_dcae_through_diffusers(tmp_path):
    """Our DC-AE is diffusers' model read back from disk: the same computation, so equal,
    with no tolerance."""
    pytest.importorskip("diffusers", reason="the DC-AE test needs diffusers (optional): pip install diffusers")
    model = tiny_dcae()
    model.save_pretrained(tmp_path / "dcae")
    tok = T.load_tokenizer("dcae", tmp_path / "dcae")
    assert (tok.channels, tok.stride, tok.seq_len(16)) == (4, 2, 64)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tokens = tok.encode(x)
        latent = model.encode(x).latent  # (2, 4, 8, 8)
        assert tokens.shape == (2, 64, 4)
        assert torch.equal(tokens, latent.flatten(2).transpose(1, 2) * T.DCAE_SCALE)
        images = tok.decode(tokens)
        assert images.shape == x.shape
        assert torch.equal(images, model.decode(T.unpatchify(tokens) / T.DCAE_SCALE).sample)
    with pytest.raises(FileNotFoundError) as e:
        T.DCAE(tmp_path / "missing")
    assert one_line(e).startswith("--vae ")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError) as e:
        T.load_tokenizer("dcae", tmp_path / "broken")
    assert one_line(e).startswith("--vae ")


def test_dcae_without_diffusers_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError) as e:
        T.load_tokenizer("dcae", tmp_path)
    assert "pip install diffusers" in one_line(e)


# ------------------------------------------------------------------------------------------
# Caching
# ------------------------------------------------------------------------------------------
def test_center_crop_is_adm():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    img = blocks.repeat(2, 0).repeat(2, 1)  # 64x96, constant 2x2 blocks: BOX halving recovers `blocks` exactly
    out = T.center_crop_arr(Image.fromarray(img), 32)  # >= 2x32 -> halve to 32x48, scale 1, center crop
    assert out.shape == (32, 32, 3)
    assert np.array_equal(out, blocks[:, 8:40])
    assert T.center_crop_arr(Image.fromarray(img), 64).shape == (64, 64, 3)  # bicubic path


def make_folder(root, sizes=((40, 48), (64, 96), (32, 32), (50, 40), (36, 80))):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        d = root / ("n0" if i < 3 else "n1")
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr if i != 2 else arr[..., 0]).save(d / f"img{i}.png")  # one grayscale image
    (root / "n1" / "notes.txt").write_text("not an image")
    return len(sizes)


@pytest.fixture()
def cache_setup(tmp_path, ref, monkeypatch):
    # one process on the CPU (the exact comparisons are with CPU results), whatever the machine
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    n = make_folder(tmp_path / "imgs")
    torch.save({"model": reference_state_dict(ref)}, tmp_path / "kl16.ckpt")
    return tmp_path, n


def cache_args(tmp, **flags):
    """The cache command line on the test tree (5 images, 3 shards of 2), with some flags
    replaced."""
    args = {"data_path": tmp / "imgs", "out": tmp / "cache", "vae": tmp / "kl16.ckpt", "img_size": 32,
            "batch_size": 2, "shard_size": 2, "num_workers": 0}
    args.update(flags)
    argv = ["cache"]
    for k, v in args.items():
        if v is not None:
            argv += ["--" + k.replace("_", "-"), str(v)]
    return argv


def silent(message):
    pass


def test_cache_write_read_round_trip(cache_setup, tiny_vae):
    tmp, n = cache_setup
    T.main(cache_args(tmp))
    assert sorted(p.name for p in (tmp / "cache").iterdir()) == [f"shard_0000{i}.pt" for i in range(3)]
    folder = T.ImageFolder(tmp / "imgs", 32)
    assert folder.classes == ["n0", "n1"]
    images = torch.stack([folder[i][0] for i in range(n)])  # (5, 3, 32, 32), ADM crop, [-1, 1]
    assert [folder[i][1] for i in range(n)] == [0, 0, 0, 1, 1]
    # the same batches as the cache (2, 2, 1 images), in this process: the same computation,
    # so equal
    with torch.no_grad():
        moments = torch.cat([tiny_vae.encode_moments(images[i:i + 2]) for i in (0, 2, 4)])
        moments_flip = torch.cat([tiny_vae.encode_moments(images[i:i + 2].flip(3)) for i in (0, 2, 4)])
    raw = torch.cat([torch.load(p, weights_only=True)["x"] for p in sorted((tmp / "cache").iterdir())])
    assert raw.shape == (n, 2, 32, 2, 2)  # (image | flip, [mean | logvar], h, w)
    assert torch.equal(raw[:, 0], moments)
    assert torch.equal(raw[:, 1], moments_flip)

    ds = T.CachedLatents(tmp / "cache", sample=False, flip=False)
    assert len(ds) == n
    tokens = torch.stack([ds[i][0] for i in range(n)])
    labels = torch.stack([ds[i][1] for i in range(n)])
    assert tokens.shape == (n, 4, 16)
    assert tokens.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.tolist() == [0, 0, 0, 1, 1]
    mean_tokens = T.patchify(moments[:, :16] * T.KL16_SCALE)
    assert torch.equal(tokens, mean_tokens)

    # flips are drawn with probability 1/2: in 40 draws each side shows up >= 8 times but
    # with probability 2e-5
    torch.manual_seed(0)
    flip_tokens = T.patchify(moments_flip[:, :16] * T.KL16_SCALE)
    ds_flip = T.CachedLatents(tmp / "cache", sample=False)
    draws = [ds_flip[3][0] for _ in range(40)]
    seen = [sum(torch.equal(t, mean_tokens[3]) for t in draws),
            sum(torch.equal(t, flip_tokens[3]) for t in draws)]
    assert seen[0] + seen[1] == 40
    assert min(seen) >= 8, seen
    # posterior samples are mean + std * N(0, 1) around the clamped posterior: 128,000
    # normalised draws have mean within 0.05 of 0 (18 standard errors) and std within 0.05
    # of 1 (25 standard errors)
    post = T.DiagonalGaussianDistribution(moments[:, None].expand(-1, 400, -1, -1, -1).reshape(-1, 32, 2, 2))
    ds_sample = T.CachedLatents(tmp / "cache", flip=False)
    draws = torch.stack([ds_sample[i][0] for i in range(n) for _ in range(400)])  # (n * 400, 4, 16)
    z = (draws / T.KL16_SCALE - T.patchify(post.mean)) / T.patchify(post.std)
    assert abs(z.mean()) < 0.05
    assert abs(z.std() - 1) < 0.05


def snapshot(root):
    """Every file under root with its size, modification time and content hash, and every
    folder."""
    files = {}
    folders = set()
    for dirpath, dirnames, filenames in os.walk(root):
        folders.update(str(Path(dirpath, d)) for d in dirnames)
        for name in filenames:
            path = Path(dirpath, name)
            stat = path.stat()
            files[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.sha1(path.read_bytes()).hexdigest())
    return files, folders


def test_cache_ranks_and_rerun(cache_setup, capsys):
    tmp, n = cache_setup
    vae = T.load_tokenizer("kl16", tmp / "kl16.ckpt")
    settings = dict(img_size=32, batch_size=2, shard_size=2, num_workers=0, log=silent)
    T.cache_latents(tmp / "imgs", tmp / "cache", vae, rank=1, world_size=2, **settings)  # rank 1 of 2: shard 1
    assert [p.name for p in (tmp / "cache").iterdir()] == ["shard_00001.pt"]
    with pytest.raises(ValueError) as e:  # incomplete cache
        T.CachedLatents(tmp / "cache")
    assert "rerun" in one_line(e)
    T.cache_latents(tmp / "imgs", tmp / "cache", vae, rank=0, world_size=2, **settings)  # rank 0 of 2: shards 0, 2
    assert len(list((tmp / "cache").iterdir())) == 3
    (tmp / "cache" / "shard_00002.pt").unlink()
    before, _ = snapshot(tmp / "cache")
    capsys.readouterr()
    T.main(cache_args(tmp))  # rerun: skips 0 and 1 (never rewrites them), redoes 2
    log = capsys.readouterr().out
    assert log.count("skipping") == 2
    assert "shard 3/3: 1 images" in log
    after, _ = snapshot(tmp / "cache")
    assert {k: v for k, v in after.items() if not k.endswith("shard_00002.pt")} == before
    assert len(T.CachedLatents(tmp / "cache")) == n


def test_cache_torchrun_two_ranks(cache_setup):
    """The real distributed path: torchrun, 2 CPU processes (gloo), each writing its own
    shards; the shards equal a one-process run with the same thread count (1), exactly."""
    tmp, _ = cache_setup
    torch.set_num_threads(1)  # as each torchrun worker (the fixture restores it)
    T.main(cache_args(tmp))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # 2 CPU processes (gloo)
    argv = cache_args(tmp, out=tmp / "cache2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", T.__file__]
    r = subprocess.run(command + argv, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # each shard written (and logged) once, by its own rank: 0 writes shards 1 and 3 of 3,
    # rank 1 shard 2
    assert r.stdout.count(" images -> ") == 3, r.stdout
    assert "skipping" not in r.stdout
    for s in range(3):
        one = torch.load(tmp / "cache" / f"shard_{s:05d}.pt", weights_only=True)
        two = torch.load(tmp / "cache2" / f"shard_{s:05d}.pt", weights_only=True)
        assert one.keys() == two.keys()
        for k in one:
            if torch.is_tensor(one[k]):
                assert torch.equal(one[k], two[k]), (s, k)
            else:
                assert one[k] == two[k], (s, k)


@pytest.fixture(scope="module")
def cli_tree(tmp_path_factory, ref):
    """A test tree with an existing, incomplete cache (shards 0 and 2 of 3: a run that
    wrongly went ahead would write shard 1) and bad inputs of every kind."""
    root = tmp_path_factory.mktemp("cli")
    make_folder(root / "imgs")
    (root / "empty" / "n0").mkdir(parents=True)
    torch.save({"model": reference_state_dict(ref)}, root / "kl16.ckpt")
    whole = (root / "kl16.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(whole[:len(whole) // 2])
    (root / "garbage.ckpt").write_bytes(b"not a checkpoint")
    torch.save({"model": {"class_emb.weight": torch.zeros(2, 2)}}, root / "emigm.ckpt")
    (root / "a_file").write_text("not a folder")
    vae = T.load_tokenizer("kl16", root / "kl16.ckpt")
    for out in ("cache", "broken_cache"):
        T.cache_latents(root / "imgs", root / out, vae, img_size=32, batch_size=2, shard_size=2, num_workers=0,
                        log=silent)
    (root / "cache" / "shard_00001.pt").unlink()
    shard = (root / "broken_cache" / "shard_00001.pt").read_bytes()
    (root / "broken_cache" / "shard_00001.pt").write_bytes(shard[:len(shard) // 2])
    return root


# (flag the message must name, the flags that replace the good ones; None drops a flag)
BAD_CLI_INPUTS = [
    ("--batch-size", {"batch_size": 0}),
    ("--batch-size", {"batch_size": "two"}),
    ("--shard-size", {"shard_size": -5}),
    ("--num-workers", {"num_workers": -1}),
    ("--img-size", {"img_size": 0}),
    ("--img-size", {"img_size": 40}),  # not a multiple of the VAE's stride 16
    ("--tokenizer", {"tokenizer": "pixel"}),
    ("--data-path", {"data_path": None}),
    ("--vae", {"vae": None}),
    ("--out", {"out": None}),
    ("--data-path", {"data_path": "{root}/nope"}),
    ("--data-path", {"data_path": "{root}/nope", "out": "{root}/new_out"}),  # --out is not created either
    ("--data-path", {"data_path": "{root}/empty"}),  # a class folder, no images
    ("--data-path", {"data_path": "{root}/a_file"}),
    ("--vae", {"vae": "{root}/nope.ckpt"}),
    ("--vae", {"vae": "{root}/truncated.ckpt"}),
    ("--vae", {"vae": "{root}/garbage.ckpt"}),
    ("--vae", {"vae": "{root}/emigm.ckpt"}),
    ("--vae", {"vae": "{root}/imgs"}),  # a folder
    ("--vae", {"tokenizer": "dcae"}),  # kl16.ckpt is no DC-AE folder
    ("--out", {"out": "{root}/a_file"}),
    ("--out", {"out": "{root}/a_file/cache"}),
    ("--out", {"shard_size": 3}),  # the cache in --out was made with --shard-size 2
    ("--out", {"img_size": 64}),  # ... and with --img-size 32
    ("--out", {"out": "{root}/broken_cache"}),  # a truncated shard in it
]


@pytest.mark.parametrize("flag, flags", BAD_CLI_INPUTS, ids=[f"{k}={v}" for k, v in BAD_CLI_INPUTS])
def test_cache_cli_bad_inputs(cli_tree, flag, flags, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    flags = {k: v.format(root=cli_tree) if isinstance(v, str) else v for k, v in flags.items()}
    before = snapshot(cli_tree)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        T.main(cache_args(cli_tree, **flags))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n")
    assert flag in err.splitlines()[-1], err  # the last line is the error, on one line
    assert snapshot(cli_tree) == before  # nothing written, created or changed


def test_cache_cli_unwritable_out(cli_tree, capsys, monkeypatch):
    # root may write anywhere: a folder without write permission is simulated
    monkeypatch.setattr(T.os, "access", lambda path, mode: False)
    before = snapshot(cli_tree)
    with pytest.raises(SystemExit) as e:
        T.main(cache_args(cli_tree))
    assert e.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert snapshot(cli_tree) == before


def test_cache_cli_error_in_a_real_process(cli_tree):
    r = subprocess.run([sys.executable, T.__file__] + cache_args(cli_tree, vae=cli_tree / "truncated.ckpt"),
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("tokenizer.py: error: --vae ")
    assert r.stderr.count("\n") == 1, r.stderr


def test_cached_latents_bad_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        T.CachedLatents(tmp_path)
    assert "tokenizer.py cache" in one_line(e)


# ------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------
def idx_bytes(arr):
    return bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def write_fake_fashion(d, n=7, gz=True):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    for name, arr in [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)]:
        data = idx_bytes(arr)
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (d / name).write_bytes(data)
    return images, labels


def test_fashion_mnist_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "FASHION_MNIST_DIRS", ())
    monkeypatch.setattr(T, "FASHION_MNIST_CACHE", tmp_path / "cache")
    for gz in (True, False):
        images, labels = write_fake_fashion(tmp_path / f"gz{gz}", gz=gz)
        x, y = T.load_fashion_mnist("train", tmp_path / f"gz{gz}")
        assert x.dtype == torch.uint8
        assert y.dtype == torch.int64
        assert np.array_equal(x.numpy(), images)
        assert np.array_equal(y.numpy(), labels)
    # no local files: download from the official source (here a file:// mirror) into the
    # cache directory
    monkeypatch.setattr(T, "FASHION_MNIST_URL", (tmp_path / "gzTrue").as_uri() + "/")
    x, _ = T.load_fashion_mnist("train")
    assert np.array_equal(x.numpy(), images)
    assert (tmp_path / "cache" / "train-images-idx3-ubyte.gz").is_file()
    with pytest.raises(FileNotFoundError) as e:  # nothing anywhere and the download fails
        T.load_fashion_mnist("test")
    assert "On an offline Debian/Ubuntu machine run: sudo apt-get install dataset-fashion-mnist" in one_line(e)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5])
    (tmp_path / "bad" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError) as e:
        T.load_fashion_mnist("train", tmp_path / "bad")
    one_line(e)
    with pytest.raises(ValueError) as e:
        T.load_fashion_mnist("valid")
    one_line(e)
    # a folder given is the only one looked at: an empty one does not fall back to the cache
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(T, "FASHION_MNIST_URL", (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(FileNotFoundError) as e:
        T.load_fashion_mnist("train", tmp_path / "empty")
    assert "empty" in one_line(e)


DEBIAN_FASHION = Path(T.FASHION_MNIST_DIRS[0])


@pytest.mark.skipif(not all((DEBIAN_FASHION / f"t10k-{n}-ubyte.gz").is_file() for n in ("images-idx3", "labels-idx1")),
                    reason=f"Fashion-MNIST is not in {DEBIAN_FASHION}: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_debian():
    x, y = T.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28)
    assert y.bincount().tolist() == [1000] * 10
    tokens = T.PixelTokenizer().encode(x[:2000, None].float() / 127.5 - 1)
    print(f"Fashion-MNIST pixel tokens: mean {tokens.mean():.3f} std {tokens.std():.3f}")
    assert 0.5 < tokens.pow(2).mean().sqrt() < 1.5  # about unit scale
