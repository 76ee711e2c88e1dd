"""Tokenizers: images <-> the continuous token sequences eMIGM models (arXiv 2503.07197, following MAR).

The paper's experiments (as its official code) see images through a frozen autoencoder:
  * ImageNet 256x256: MAR's KL-16 VAE (16 channels, stride 16 -> 16x16 = 256 tokens), latents x 0.2325;
  * ImageNet 512x512: DC-AE f32c32 (32 channels, stride 32 -> 256 tokens), latents x 0.3189 (via diffusers);
  * small data on a CPU (Fashion-MNIST, ours): no autoencoder; non-overlapping pixel patches are the tokens.
All three share one interface: encode(images (B, C, H, W) in [-1, 1]) -> tokens (B, L, C'), decode(tokens) ->
images, .channels, .stride, .seq_len(img_size). Tokens are row-major over (h, w), MAR's patchify order. Also here:
latent caching (MAR's main_cache.py), the CachedLatents dataset train.py reads, and a Fashion-MNIST IDX loader.

  python tokenizer.py cache --data-path imagenet/train --out cache/kl16-256 --vae pretrained/kl16.ckpt
  torchrun --nproc_per_node=8 tokenizer.py cache ...   # each rank writes a disjoint set of shards
  python tokenizer.py cache --tokenizer dcae --vae dc-ae-f32c32-in-1.0-diffusers --img-size 512 ...  # 512px
Tests: python -m pytest -q test_tokenizer.py
"""
import argparse
import gzip
import math
import os
import sys
import urllib.request
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

KL16_SCALE = 0.2325  # MAR: "normalises the latent std to 1"; tokens = latent * scale, decode(tokens / scale)
DCAE_SCALE = 0.3189  # eMIGM's value for dc-ae-f32c32-in-1.0 (a code comment says 0.3156; 0.3189 is what runs)
PIXEL_SCALE = 1.0  # [-1, 1] pixels: Fashion-MNIST has std 0.71, rms 0.83; a power of two keeps round trips exact
LOGVAR_CLAMP = (-30.0, 20.0)  # MAR's DiagonalGaussianDistribution
KL16_HELP = "get MAR's kl16.ckpt with LTH14/mar's util/download.py (download_pretrained_vae)"
DCAE_HELP = "download mit-han-lab/dc-ae-f32c32-in-1.0-diffusers into a local directory and pass that directory"


def patchify(x, p=1):
    """MAR's patchify ('nchpwq->nhwcpq'): x (B, C, H, W) -> tokens (B, (H/p)(W/p), C p p), row-major over (h, w)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens, p=1):
    """Inverse of patchify for a square grid: tokens (B, L, C p p) -> (B, C, H, W)."""
    B, L, D = tokens.shape
    h, c = math.isqrt(L), D // (p * p)
    if h * h != L:
        raise ValueError(f"cannot unpatchify {L} tokens: expected a square grid (L = h*h)")
    x = tokens.reshape(B, h, h, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(B, c, h * p, h * p)


# ==== KL-16 VAE: MAR's models/vae.py (the LDM AutoencoderKL), same modules and state_dict keys as kl16.ckpt =======
def swish(x):
    return x * torch.sigmoid(x)  # as MAR writes it (F.silu rounds differently in the last bit)


def Normalize(c):
    return nn.GroupNorm(32, c, eps=1e-6)  # eps 1e-6, not PyTorch's 1e-5 (a measurable difference)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)  # 1x1 projection of the residual when widths change

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, H, W); no time embedding, dropout 0
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, 1x1-conv projections, residual."""
    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        B, C, H, W = x.shape
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        k, v = self.k(h).reshape(B, C, H * W), self.v(h).reshape(B, C, H * W)  # (B, C, HW)
        w = torch.softmax(torch.bmm(q, k) * C ** -0.5, dim=2)  # (B, HW query, HW key)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Resample(nn.Module):
    """Down: zero-pad one column right and one row at the bottom (not padding=1), 3x3 conv stride 2. Up: nearest x2."""
    def __init__(self, c, down):
        super().__init__()
        self.down, self.conv = down, nn.Conv2d(c, c, 3, 2 if down else 1, 0 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: n ResNet blocks (each + attention where MAR has it), then resample under MAR's name, if any."""
    def __init__(self, cin, cout, n, attn, resample):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(n))
        self.attn = nn.ModuleList(AttnBlock(cout) for _ in range(n if attn else 0))  # empty: no keys
        self.resample = resample
        if resample:
            self.add_module(resample, Resample(cout, down=resample == "downsample"))

    def forward(self, h):
        for j, block in enumerate(self.block):
            h = self.attn[j](block(h)) if len(self.attn) else block(h)
        return getattr(self, self.resample)(h) if self.resample else h


def mid_block(c):  # ResNet, attention, ResNet at the lowest resolution; keys mid.block_1, mid.attn_1, mid.block_2
    return nn.Sequential(OrderedDict(block_1=ResnetBlock(c, c), attn_1=AttnBlock(c), block_2=ResnetBlock(c, c)))


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, z_channels, num_res_blocks=2, resolution=256, attn_resolutions=(16,)):
        super().__init__()
        w, n = [ch] + [ch * m for m in ch_mult], len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        # attention where the *nominal* resolution (from the 256px config) is 16, whatever the input size
        self.down = nn.Sequential(*(Level(w[i], w[i + 1], num_res_blocks, resolution // 2 ** i in attn_resolutions,
                                          "downsample" if i < n - 1 else None) for i in range(n)))
        self.mid = mid_block(w[-1])
        self.norm_out, self.conv_out = Normalize(w[-1]), nn.Conv2d(w[-1], 2 * z_channels, 3, 1, 1)

    def forward(self, x):  # (B, 3, H, W) -> (B, 2 z, H/16, W/16)
        return self.conv_out(swish(self.norm_out(self.mid(self.down(self.conv_in(x))))))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, z_channels, num_res_blocks=2):
        super().__init__()
        w, n = [ch * m for m in ch_mult], len(ch_mult)
        self.conv_in = nn.Conv2d(z_channels, w[-1], 3, 1, 1)
        self.mid = mid_block(w[-1])
        # index i = level i, run from the last level down to 0; one more ResNet block than the encoder, no attention
        self.up = nn.ModuleList(Level(w[min(i + 1, n - 1)], w[i], num_res_blocks + 1, False,
                                      "upsample" if i > 0 else None) for i in range(n))
        self.norm_out, self.conv_out = Normalize(w[0]), nn.Conv2d(w[0], 3, 3, 1, 1)

    def forward(self, z):  # (B, z, h, w) -> (B, 3, 16h, 16w); no tanh or clamp: nominally in [-1, 1]
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class DiagonalGaussian:
    """MAR's DiagonalGaussianDistribution: moments (B, 2C, h, w) = [mean | logvar], logvar clamped to [-30, 20]."""
    def __init__(self, moments):
        self.parameters = moments  # unclamped: what caching stores
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_CLAMP)
        self.std, self.var = torch.exp(0.5 * self.logvar), torch.exp(self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def latent(self, sample=True, generator=None):  # what training sees: a posterior sample (MAR), or the mean
        return self.sample(generator) if sample else self.mode()

    def kl(self):
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class Tokenizer(nn.Module):
    """The interface above. Subclasses map images to an unscaled latent grid and back (encode_latent, decode_latent)
    and set channels, stride, scale; tokens are the grid's patches (1x1 for autoencoders) times the scale."""
    patch, in_channels = 1, 3  # autoencoders: RGB in, one token per latent position

    def seq_len(self, img_size):
        return (img_size // self.stride) ** 2

    def encode(self, images, sample=True, generator=None):  # (B, c, H, W) in [-1, 1] -> tokens (B, L, C)
        s, shape = self.stride, tuple(images.shape)
        if len(shape) != 4 or shape[1] != self.in_channels or shape[2] % s or shape[3] % s:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W) with H, W multiples of {s}, got {shape}")
        return patchify(self.encode_latent(images, sample, generator) * self.scale, self.patch)

    def decode(self, tokens):  # (B, L, C) -> images (B, c, H, W)
        return self.decode_latent(unpatchify(tokens / self.scale, self.patch))


class KL16VAE(Tokenizer):
    """MAR's AutoencoderKL(embed_dim=16, ch_mult=(1,1,2,2,4)); `ch` exposed so reduced-width copies can be built."""
    kind, scale = "kl16", KL16_SCALE

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), embed_dim=16, num_res_blocks=2):
        super().__init__()
        self.encoder, self.decoder = (net(ch, ch_mult, embed_dim, num_res_blocks) for net in (Encoder, Decoder))
        self.quant_conv, self.post_quant_conv = (nn.Conv2d(c, c, 1) for c in (2 * embed_dim, embed_dim))
        self.channels, self.stride = embed_dim, 2 ** (len(ch_mult) - 1)

    def encode_moments(self, images):  # (B, 3, H, W) in [-1, 1] -> unclamped [mean | logvar] (B, 2C, H/16, W/16)
        return self.quant_conv(self.encoder(images))

    def encode_latent(self, images, sample=True, generator=None):  # -> (B, C, H/16, W/16)
        return DiagonalGaussian(self.encode_moments(images)).latent(sample, generator)

    def decode_latent(self, z):  # (B, C, h, w) unscaled latent -> (B, 3, 16h, 16w)
        return self.decoder(self.post_quant_conv(z))

    @classmethod
    def from_checkpoint(cls, path):
        """Load MAR's kl16.ckpt (weights under 'model') strictly, unlike MAR; width and latent size come from it."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"KL-16 VAE checkpoint {path} is not a file: {KL16_HELP}")
        try:  # weights_only refuses pickled objects other than tensors and plain containers
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot read {path} as a checkpoint of plain tensors ({type(e).__name__}); if you trust "
                             f"it, re-save its 'model' dict with torch.save, else {KL16_HELP}") from None
        sd = sd.get("model", sd) if isinstance(sd, dict) else {}  # MAR's layout; a bare state_dict works too
        # an LDM training checkpoint may carry its discriminator/LPIPS under 'loss.': not part of the autoencoder
        sd = {k: v for k, v in sd.items() if torch.is_tensor(v) and not k.startswith("loss.")}
        ch, z = (sd[k].shape[0] if k in sd else d for k, d in [("encoder.conv_in.weight", 128),
                                                                ("post_quant_conv.weight", 16)])
        with torch.device("meta"):  # build without initialising 66M parameters; load_state_dict assigns the real ones
            vae = cls(ch=ch, embed_dim=z)
        want = vae.state_dict()
        bad = {"missing": sorted(set(want) - set(sd)), "unexpected": sorted(set(sd) - set(want)),
               "of the wrong shape": [k for k in want if k in sd and sd[k].shape != want[k].shape]}
        if any(bad.values()):  # one line naming a few keys (torch's own error lists them all, over many lines)
            found = ", ".join(f"{len(keys)} keys {what} {keys[:2]}" for what, keys in bad.items() if keys)
            raise ValueError(f"{path} is not a KL-16 VAE checkpoint ({found}): {KL16_HELP}")
        vae.load_state_dict(sd, strict=True, assign=True)
        return vae.float().eval().requires_grad_(False)


# ==== DC-AE f32c32 (512px) through diffusers, and the pixel tokenizer (small data, no autoencoder) ==================
class DCAE(Tokenizer):
    """diffusers' AutoencoderDC loaded from a local directory; deterministic latents x 0.3189 (official)."""
    kind, scale = "dcae", DCAE_SCALE

    def __init__(self, path):
        super().__init__()
        try:
            from diffusers import AutoencoderDC
        except ImportError:
            raise ImportError("DC-AE needs diffusers, an optional dependency: pip install diffusers") from None
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"no DC-AE (config.json) in {path}: {DCAE_HELP}")
        self.model = AutoencoderDC.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
        self.model.float().eval().requires_grad_(False)
        cfg = self.model.config
        self.channels, self.stride = cfg.latent_channels, 2 ** (len(cfg.encoder_block_out_channels) - 1)

    def encode_latent(self, images, sample=False, generator=None):  # deterministic: `sample` is ignored
        return self.model.encode(images).latent  # (B, C, H/32, W/32), unscaled

    def decode_latent(self, z):
        return self.model.decode(z).sample


class PixelTokenizer(Tokenizer):
    """Non-overlapping p x p pixel patches as tokens: 28x28 with p=4 gives 49 tokens of 16 values. Round trip exact."""
    kind = "pixel"

    def __init__(self, patch=4, img_size=28, in_channels=1, scale=PIXEL_SCALE):
        super().__init__()
        if img_size % patch:  # fail here, before a model is sized with seq_len(img_size)
            raise ValueError(f"img_size {img_size} is not a multiple of patch {patch}")
        self.patch, self.in_channels, self.scale = patch, in_channels, scale  # img_size: only checked
        self.channels, self.stride = in_channels * patch * patch, patch

    def encode_latent(self, x, sample=False, generator=None):  # no autoencoder: the latent grid is the image itself
        return x
    decode_latent = encode_latent


def load_tokenizer(kind, path=None, **kwargs):
    """'kl16' (path: kl16.ckpt) | 'dcae' (path: local diffusers dir) | 'pixel' (kwargs: patch, img_size, in_channels)"""
    if kind not in ("kl16", "dcae", "pixel"):
        raise ValueError(f"unknown tokenizer {kind!r}: choose 'kl16', 'dcae' or 'pixel'")
    if kind != "pixel" and path is None:
        raise ValueError(f"tokenizer {kind!r} needs a path (--vae): " + (KL16_HELP if kind == "kl16" else DCAE_HELP))
    return PixelTokenizer(**kwargs) if kind == "pixel" else {"kl16": KL16VAE.from_checkpoint, "dcae": DCAE}[kind](path)


# ==== Latent caching (MAR's main_cache.py) and the dataset that reads it ==========================================
def center_crop_arr(pil_image, image_size):
    """ADM's center crop (used by MAR and eMIGM): halve with BOX while >= 2x, bicubic resize, center crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]  # (S, S, 3) uint8


class ImageFolder(torch.utils.data.Dataset):
    """torchvision's ImageFolder order (sorted class dirs -> labels 0..K-1, sorted files), ADM crop, [-1, 1]."""
    extensions = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, root, img_size=256):
        root, self.img_size = Path(root), img_size
        if not root.is_dir():
            raise FileNotFoundError(f"--data-path {root} is not a directory: pass an ImageFolder DIR/<class>/<img>")
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.samples = [(os.path.join(dirpath, f), label) for label, c in enumerate(classes)
                        for dirpath, _, files in sorted(os.walk(root / c, followlinks=True))
                        for f in sorted(files) if f.lower().endswith(self.extensions)]
        if not self.samples:
            raise FileNotFoundError(f"no images found under {root}: expected an ImageFolder tree "
                                    f"{root}/<class>/<image>.jpg (one sub-directory per class)")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        with Image.open(path) as im:
            arr = center_crop_arr(im.convert("RGB"), self.img_size)
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255)  # ToTensor
        return (x - 0.5) / 0.5, label  # Normalize(0.5, 0.5) -> [-1, 1]


def cache_latents(data_path, out, tok, *, img_size=256, batch_size=128, shard_size=10000, num_workers=8,
                  rank=0, world_size=1, device="cpu", log=print):
    """ImageFolder -> out/shard_XXXXX.pt; shard s is rank s % world_size's; a rerun skips finished shards."""
    if img_size % tok.stride:
        raise ValueError(f"--img-size {img_size} is not a multiple of the tokenizer's stride {tok.stride}")
    data, out, kind = ImageFolder(data_path, img_size), Path(out), tok.kind
    n, num_shards, tok = len(data), math.ceil(len(data) / shard_size), tok.to(device)
    # what a shard stores per image: KL-16's unclamped posterior moments (as MAR), DC-AE's latent (unscaled)
    encode = torch.no_grad()(tok.encode_moments if kind == "kl16" else tok.encode_latent)
    meta = dict(kind=kind, img_size=img_size, num_shards=num_shards, num_images=n)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(rank, num_shards, world_size):
        path = out / f"shard_{s:05d}.pt"
        if path.exists():
            old = torch.load(path, mmap=True, weights_only=True)
            if any(old[k] != v for k, v in meta.items()):
                raise ValueError(f"{out} holds a cache made with other settings ({ {k: old[k] for k in meta} }): "
                                 f"use a new --out")
            log(f"shard {s + 1}/{num_shards} already done, skipping")
            continue
        index = range(s * shard_size, min(n, (s + 1) * shard_size))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, index), batch_size=batch_size,
                                             num_workers=num_workers, pin_memory=device != "cpu")
        feats, labels = [], []
        for x, y in loader:
            x = x.to(device)  # (B, 3, S, S)
            feats.append(torch.stack([encode(x), encode(x.flip(dims=[3]))], 1).float().cpu())  # (B, 2, K, h, w)
            labels.append(y)
        shard = dict(meta, shard=s, x=torch.cat(feats), labels=torch.cat(labels).long(), index=torch.tensor(index))
        tmp = path.with_suffix(f".tmp{rank}")
        torch.save(shard, tmp)
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written shard behind
        log(f"shard {s + 1}/{num_shards}: {len(index)} images -> {path}")


class CachedLatents(torch.utils.data.Dataset):
    """Cached shards -> (tokens (L, C) float32, label int64): the image or its flip at random and, for KL-16, a fresh
    posterior sample (official training); sample=False gives the posterior mean, flip=False never flips."""
    def __init__(self, root, sample=True, flip=True):
        self.files = sorted(Path(root).glob("shard_*.pt"))
        if not self.files:
            raise FileNotFoundError(f"no cached shards (shard_*.pt) in {root}: "
                                    f"make them with python tokenizer.py cache --data-path DIR --out {root} --vae PATH")
        self.shards = self.open()
        first, done = self.shards[0], {sh["shard"] for sh in self.shards}
        if len(done) != first["num_shards"] or any(sh["kind"] != first["kind"] for sh in self.shards):
            missing = sorted(set(range(first["num_shards"])) - done)[:5]
            raise ValueError(f"cache in {root} is incomplete (shards {missing} missing) or mixed: rerun the same "
                             f"python tokenizer.py cache command (finished shards are skipped)")
        self.kind, self.img_size, self.sample, self.flip = first["kind"], first["img_size"], sample, flip
        self.scale = (KL16VAE if self.kind == "kl16" else DCAE).scale  # the tokenizer's own, not a second copy
        self.offsets = np.cumsum([0] + [len(sh["labels"]) for sh in self.shards])

    def open(self):  # memory-mapped: pages are read on access, shared by forked workers
        return [torch.load(f, mmap=True, weights_only=True) for f in self.files]

    def __getstate__(self):  # spawned workers re-open the files instead of receiving the tensors pickled
        return dict(self.__dict__, shards=None)

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        self.shards = self.shards or self.open()
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        shard, j = self.shards[s], i - int(self.offsets[s])
        f = int(torch.rand(()) < 0.5) if self.flip else 0  # horizontal-flip augmentation, in latent space
        x = shard["x"][j, f].float()[None]  # (1, K, h, w)
        x = DiagonalGaussian(x).latent(self.sample) if self.kind == "kl16" else x  # DC-AE: deterministic
        return patchify(x * self.scale)[0], shard["labels"][j].long()  # (L, C), ()


# ==== Fashion-MNIST (IDX files): a path, else Debian's dataset-fashion-mnist, else the official download ==========
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)  # apt-get install dataset-fashion-mnist (.gz files)
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # zalandoresearch's README
FASHION_MNIST_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emigm-mini" / "fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path):
    """An IDX file (optionally .gz) -> uint8 array. Header: 0, 0, 0x08 (ubyte), ndim, then big-endian sizes."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3] if len(data) > 4 and data[:3] == b"\x00\x00\x08" else 0
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if not ndim or len(data) != 4 + 4 * ndim + math.prod(shape):
        raise ValueError(f"{path} is not a complete uint8 IDX file: delete it and get Fashion-MNIST again")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split="train", path=None):
    """-> (images uint8 (N, 28, 28), labels int64 (N,)); a download goes into `path`, else into our cache."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}: choose 'train' or 'test'")
    names = FASHION_MNIST_FILES[split]
    dirs = [Path(d) for d in ([path] if path else []) + [*FASHION_MNIST_DIRS, FASHION_MNIST_CACHE]]

    def files(d):  # raw or gzipped, as Debian ships them
        return [next((p for p in (d / n, d / (n + ".gz")) if p.is_file()), None) for n in names]
    found = next((f for f in map(files, dirs) if all(f)), None)
    if found is None:
        d = Path(path or FASHION_MNIST_CACHE)
        try:
            d.mkdir(parents=True, exist_ok=True)
            for n in names:
                with urllib.request.urlopen(FASHION_MNIST_URL + n + ".gz", timeout=30) as r:
                    (d / (n + ".gz.part")).write_bytes(r.read())
                os.replace(d / (n + ".gz.part"), d / (n + ".gz"))
        except Exception as e:
            raise FileNotFoundError(f"Fashion-MNIST ({split}) is not in {', '.join(map(str, dirs))} and the download "
                                    f"failed ({type(e).__name__}: {' '.join(str(e).split())}): apt-get install "
                                    f"dataset-fashion-mnist, or pass as path a directory holding {names[0]}.gz and "
                                    f"{names[1]}.gz from github.com/zalandoresearch/fashion-mnist") from None
        found = files(d)
    images, labels = map(read_idx, found)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST files {found[0]} and {found[1]} do not fit together: get them again")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# ==== Command line ================================================================================================
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cache", help="encode an ImageFolder tree into latent shards (MAR's main_cache.py)")
    p.add_argument("--data-path", required=True, help="ImageFolder root: DIR/<class>/<image>")
    p.add_argument("--out", required=True, help="output directory for shard_XXXXX.pt")
    p.add_argument("--vae", required=True, help="kl16.ckpt, or a local diffusers DC-AE directory")
    p.add_argument("--tokenizer", default="kl16", choices=["kl16", "dcae"])
    d = cache_latents.__kwdefaults__  # the defaults live in one place
    p.add_argument("--img-size", type=int, default=d["img_size"])  # 256 for KL-16, 512 for DC-AE (the paper)
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--shard-size", type=int, default=d["shard_size"])  # ImageNet: 129 shards of ~650 MB (KL-16 fp32)
    p.add_argument("--num-workers", type=int, default=d["num_workers"])
    args = vars(parser.parse_args(argv))
    del args["command"]
    # torchrun: ranks need no communication, only their share of the shards and their own GPU
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    log = print if rank == 0 else (lambda *a: None)
    tok = load_tokenizer(args.pop("tokenizer"), args.pop("vae"))
    cache_latents(tok=tok, rank=rank, world_size=world_size, device=device, log=log, **args)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
