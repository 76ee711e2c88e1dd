"""Tokenizers of eMIGM (arXiv 2503.07197, Sec. 5; as MAR): images <-> continuous tokens.
256px: MAR's KL-16 VAE (x 0.2325); 512px: DC-AE f32c32 (x 0.3189); small data: pixel patches.
Then ImageFolder, Fashion-MNIST and the latent cache (MAR's main_cache.py):
  python tokenizer.py cache --data-path imagenet/train --out cache/kl16-256 --vae kl16.ckpt
  torchrun --nproc_per_node=8 tokenizer.py cache ...   # each rank writes its own shards
Tests: python -m pytest -q test_tokenizer.py
"""
import argparse
import gzip
import math
import os
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image

KL16_SCALE = 0.2325  # MAR: "normalises the latent std to 1"; tokens = latent x scale
DCAE_SCALE = 0.3189  # eMIGM's (a code comment there says 0.3156)
PIXEL_SCALE = 1.0  # pixels in [-1, 1] (Fashion-MNIST: std 0.71); exact round trips
KL16_HELP = "get MAR's kl16.ckpt with LTH14/mar's util/download.py"
DCAE_HELP = "pass a local copy of mit-han-lab/dc-ae-f32c32-in-1.0-diffusers"
# Fashion-MNIST: a given path, else Debian's dataset-fashion-mnist, else the download
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_HELP = ("On an offline Debian/Ubuntu machine run: sudo apt-get install "
                      "dataset-fashion-mnist (or pass a folder with the IDX .gz files)")
FASHION_MNIST_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                           "emigm-mini", "fashion-mnist")
FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}  # of the file names


def patchify(x, p=1):
    """MAR's patchify: x (B, C, H, W) -> (B, (H/p)(W/p), C p p), row-major."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens, p=1):
    """patchify's inverse, square grids: tokens (B, L, C p p) -> (B, C, H, W)."""
    B, L, D = tokens.shape
    h = math.isqrt(L)
    if h * h != L:
        raise ValueError(f"cannot unpatchify {L} tokens: L must be a square")
    x = tokens.reshape(B, h, h, D // (p * p), p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(B, D // (p * p), h * p, h * p)


# ---- KL-16 VAE: MAR's models/vae.py (LDM's AutoencoderKL), with the keys of kl16.ckpt
def nonlinearity(x):
    return x * torch.sigmoid(x)  # swish, as MAR writes it (F.silu rounds differently)


def Normalize(in_channels):
    return nn.GroupNorm(32, in_channels, eps=1e-6)  # 32 groups; eps not PyTorch's 1e-5


class ResnetBlock(nn.Module):  # no time embedding, dropout 0
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(nonlinearity(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x):
        h = self.norm(x)
        B, C, H, W = x.shape
        q = self.q(h).reshape(B, C, H * W).permute(0, 2, 1)  # (B, HW, C)
        k = self.k(h).reshape(B, C, H * W)  # (B, C, HW)
        v = self.v(h).reshape(B, C, H * W)  # (B, C, HW)
        # single-head attention over the h*w positions: softmax(q^T k / sqrt(C))
        w = torch.softmax(torch.bmm(q, k) * C ** -0.5, dim=2)  # (B, HW queries, HW keys)
        h = torch.bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)
        return x + self.proj_out(h)


def mid_block(channels):
    # the lowest resolution of Encoder and Decoder: ResNet, attention, ResNet
    blocks = dict(block_1=ResnetBlock(channels, channels), attn_1=AttnBlock(channels),
                  block_2=ResnetBlock(channels, channels))
    return nn.Sequential(OrderedDict(blocks))


class Encoder(nn.Module):
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 resolution=256, z_channels=16):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, padding=1)
        block_in = ch
        self.down = nn.ModuleList()
        for i_level, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for i_block in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                # attention where the 256px config's resolution is 16, whatever the input
                if resolution // 2 ** i_level in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if i_level != len(ch_mult) - 1:
                # pad a zero column right and a zero row below (not padding=1)
                conv = nn.Conv2d(block_in, block_in, kernel_size=3, stride=2)
                down.downsample = nn.Sequential(OrderedDict(pad=nn.ZeroPad2d((0, 1, 0, 1)), conv=conv))
            self.down.append(down)
        self.mid = mid_block(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for down in self.down:
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (B, 2 z, H/16, W/16)


class Decoder(nn.Module):  # one more ResNet block per level, no attention
    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = mid_block(block_in)
        # built from the lowest level up, prepended: self.up[i] is level i
        self.up = nn.ModuleList()
        for i_level in reversed(range(len(ch_mult))):
            up = nn.Module()
            up.block = nn.ModuleList()
            for i_block in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, ch * ch_mult[i_level]))
                block_in = ch * ch_mult[i_level]
            if i_level != 0:
                # nearest-neighbour x2, then a 3x3 conv
                conv = nn.Conv2d(block_in, block_in, kernel_size=3, padding=1)
                up.upsample = nn.Sequential(OrderedDict(interpolate=nn.Upsample(scale_factor=2.0), conv=conv))
            self.up.insert(0, up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, kernel_size=3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (B, 3, 16h, 16w), no clamp


class DiagonalGaussianDistribution:
    """MAR's posterior: parameters (B, 2C, h, w) = [mean | logvar], logvar clamped."""
    def __init__(self, parameters):
        self.parameters = parameters  # unclamped: what the latent cache stores
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


# ---- The tokenizers: KL-16 (x 0.2325), DC-AE f32c32 (x 0.3189), pixel patches
class Tokenizer(nn.Module):
    """Tokens: patches of a latent grid x scale. A subclass sets kind, scale, channels,
    stride and maps images to the grid and back."""
    patch = 1  # autoencoders: one token per latent position
    in_channels = 3

    def seq_len(self, img_size):
        return (img_size // self.stride) ** 2

    def encode(self, images, sample=True, generator=None):
        B, c, H, W = images.shape  # in [-1, 1]
        if c != self.in_channels or H % self.stride or W % self.stride:
            raise ValueError(f"images {tuple(images.shape)}: expected {self.in_channels} channels, "
                             f"H and W multiples of {self.stride}")
        latent = self.encode_latent(images, sample, generator)
        return patchify(latent * self.scale, self.patch)  # (B, L, C)

    def decode(self, tokens):
        return self.decode_latent(unpatchify(tokens / self.scale, self.patch))


class KL16VAE(Tokenizer):
    """MAR's AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)); `ch`: reduced widths."""
    kind = "kl16"
    scale = KL16_SCALE

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), embed_dim=16, num_res_blocks=2):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels=embed_dim)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels=embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)
        self.channels = embed_dim
        self.stride = 2 ** (len(ch_mult) - 1)

    def encode_moments(self, images):
        return self.quant_conv(self.encoder(images))  # unclamped [mean | logvar] (B, 2C, h, w)

    def encode_latent(self, images, sample=True, generator=None):
        posterior = DiagonalGaussianDistribution(self.encode_moments(images))
        return posterior.sample(generator) if sample else posterior.mode()  # (B, C, H/16, W/16)

    def decode_latent(self, z):
        return self.decoder(self.post_quant_conv(z))  # (B, 3, 16h, 16w), z unscaled

    @classmethod
    def from_checkpoint(cls, path):
        """MAR's kl16.ckpt (weights under 'model'), loaded strictly (not as MAR)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--vae {path} is not a file: {KL16_HELP}")
        try:  # weights_only: plain tensors and containers, no pickled objects
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"--vae {path} is not a checkpoint of plain tensors "
                             f"({type(error).__name__}; truncated?): {KL16_HELP}") from None
        # or a bare state_dict; 'loss.*' (LDM's discriminator) is no autoencoder
        state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else {}
        state_dict = {k: v for k, v in state_dict.items()
                      if torch.is_tensor(v) and not k.startswith("loss.")}
        # width and latent size from the shapes; meta device: no time spent initialising
        ch = state_dict.get("encoder.conv_in.weight", torch.empty(128)).shape[0]
        z = state_dict.get("post_quant_conv.weight", torch.empty(16)).shape[0]
        with torch.device("meta"):
            vae = cls(ch=ch, embed_dim=z)
        try:
            vae.load_state_dict(state_dict, strict=True, assign=True)
        except RuntimeError as error:
            found = " ".join(str(error).split())[:200]
            raise ValueError(f"--vae {path} is not a KL-16 VAE ({found}...): {KL16_HELP}") from None
        return vae.float().eval().requires_grad_(False)


class DCAE(Tokenizer):
    """diffusers' AutoencoderDC from a local folder; deterministic latents."""
    kind = "dcae"
    scale = DCAE_SCALE

    def __init__(self, path):
        super().__init__()
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"--vae {path} holds no DC-AE config.json: {DCAE_HELP}")
        try:
            from diffusers import AutoencoderDC
            self.model = AutoencoderDC.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
        except ImportError:
            raise ValueError("--tokenizer dcae needs diffusers: pip install diffusers") from None
        except Exception as error:
            raise ValueError(f"--vae {path}: {type(error).__name__}: {DCAE_HELP}") from None
        self.model.float().eval().requires_grad_(False)
        self.channels = self.model.config.latent_channels
        self.stride = 2 ** (len(self.model.config.encoder_block_out_channels) - 1)

    def encode_latent(self, images, sample=False, generator=None):
        return self.model.encode(images).latent  # (B, C, H/32, W/32), deterministic

    def decode_latent(self, z):
        return self.model.decode(z).sample


class PixelTokenizer(Tokenizer):
    """No autoencoder: p x p pixel patches are the tokens (28x28, p=4: 49 tokens of 16)."""
    kind = "pixel"

    def __init__(self, patch=4, img_size=28, in_channels=1, scale=PIXEL_SCALE):
        super().__init__()
        if img_size % patch:  # checked before a model is sized with seq_len(img_size)
            raise ValueError(f"img_size {img_size} is not a multiple of patch {patch}")
        self.patch = patch
        self.in_channels = in_channels
        self.scale = scale
        self.channels = in_channels * patch * patch
        self.stride = patch

    def encode_latent(self, images, sample=False, generator=None):
        return images  # the latent grid is the image

    def decode_latent(self, z):
        return z


def load_tokenizer(kind, path=None, **kwargs):
    """'kl16' (path: kl16.ckpt), 'dcae' (a diffusers folder), 'pixel' (kwargs)."""
    if kind == "pixel":
        return PixelTokenizer(**kwargs)
    if kind not in ("kl16", "dcae"):
        raise ValueError(f"--tokenizer {kind!r}: choose 'kl16', 'dcae' or 'pixel'")
    if path is None:
        raise ValueError(f"--tokenizer {kind} needs --vae: {DCAE_HELP if kind == 'dcae' else KL16_HELP}")
    return KL16VAE.from_checkpoint(path) if kind == "kl16" else DCAE(path)


# ---- Datasets: an ImageFolder tree with ADM's crop, and Fashion-MNIST
def center_crop_arr(pil_image, image_size):
    """ADM's center crop (MAR, eMIGM): BOX halving while >= 2x, bicubic resize, crop."""
    while min(*pil_image.size) >= 2 * image_size:
        half = tuple(x // 2 for x in pil_image.size)
        pil_image = pil_image.resize(half, resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    size = tuple(round(x * scale) for x in pil_image.size)
    arr = np.array(pil_image.resize(size, resample=Image.BICUBIC))
    y = (arr.shape[0] - image_size) // 2
    x = (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]  # (S, S, 3) uint8


class ImageFolder(torch.utils.data.Dataset):
    """torchvision's order (sorted class folders: labels 0..K-1), ADM's crop, [-1, 1]."""
    extensions = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, root, img_size=256):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data-path {root} is not a folder: pass DIR/<class>/<image>")
        self.img_size = img_size
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.samples = []  # (path, label), as torchvision's
        for label, name in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
                for file in sorted(files):
                    if file.lower().endswith(self.extensions):
                        self.samples.append((os.path.join(folder, file), label))
        if not self.samples:
            raise FileNotFoundError(f"--data-path {root} has no images: pass DIR/<class>/<image>")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        with Image.open(path) as image:
            arr = center_crop_arr(image.convert("RGB"), self.img_size)
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255)  # ToTensor: (3, S, S)
        return (x - 0.5) / 0.5, label  # Normalize(0.5, 0.5)


def read_idx(path):
    """IDX file (raw or .gz) -> uint8 array. Header: 0, 0, 8, ndim, sizes."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3] if len(data) > 4 and data[:3] == b"\x00\x00\x08" else 0
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if ndim == 0 or len(data) != 4 + 4 * ndim + math.prod(shape):
        raise ValueError(f"{path} is no complete uint8 IDX file: get it again")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split="train", path=None):
    """-> (images uint8 (N, 28, 28), labels int64 (N,)); downloads go to `path` or our cache."""
    if split not in FASHION_MNIST_PREFIX:
        raise ValueError(f"Fashion-MNIST split {split!r}: choose 'train' or 'test'")
    prefix = FASHION_MNIST_PREFIX[split]
    names = {"images": f"{prefix}-images-idx3-ubyte", "labels": f"{prefix}-labels-idx1-ubyte"}
    # a path given is the only place looked at (a wrong one must not fall back to another copy)
    folders = [Path(folder) for folder in FASHION_MNIST_DIRS] + [FASHION_MNIST_CACHE]
    if path is not None:
        folders = [Path(path)]
    # raw or .gz (as Debian ships them), from the first folder that has them
    files = [{k: d / (name + ext) for k, name in names.items()} for d in folders for ext in ("", ".gz")]
    found = [f for f in files if all(file.is_file() for file in f.values())]
    if not found:
        # the official files (zalandoresearch's README), each whole or not at all
        target = FASHION_MNIST_CACHE if path is None else Path(path)
        try:
            target.mkdir(parents=True, exist_ok=True)
            for name in names.values():
                with urllib.request.urlopen(FASHION_MNIST_URL + name + ".gz", timeout=30) as response:
                    (target / (name + ".part")).write_bytes(response.read())
                os.replace(target / (name + ".part"), target / (name + ".gz"))
        except Exception as error:
            reason = f"Fashion-MNIST is not in {', '.join(map(str, folders))}; download: {error}"
            raise FileNotFoundError(f"{' '.join(reason.split())}. {FASHION_MNIST_HELP}") from None
        found = [{k: target / (name + ".gz") for k, name in names.items()}]
    images = read_idx(found[0]["images"])  # (N, 28, 28)
    labels = read_idx(found[0]["labels"])  # (N,)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{found[0]['images']} and its labels differ in size: get them again")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# ---- The latent cache (MAR's main_cache.py) and the dataset that reads it
def cache_latents(data_path, out, tok, *, img_size=256, batch_size=128, shard_size=10000,
                  num_workers=8, rank=0, world_size=1, device="cpu", log=print):
    """ImageFolder -> out/shard_XXXXX.pt: per image and its flip, KL-16's unclamped moments
    (MAR) or DC-AE's latent. Shard s is rank s % world_size's; a rerun skips done shards."""
    if img_size % tok.stride:
        raise ValueError(f"--img-size {img_size}: pass a multiple of the VAE's stride {tok.stride}")
    data = ImageFolder(data_path, img_size)
    out = Path(out)
    num_shards = math.ceil(len(data) / shard_size)
    settings = dict(kind=tok.kind, img_size=img_size, shard_size=shard_size,
                    num_shards=num_shards, num_images=len(data))
    # before any work: --out is writable, and its shards have the same settings
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out} cannot be made ({error.strerror}): pass a new folder") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} is not writable: pass a folder you can write")
    for path in sorted(out.glob("shard_*.pt")):
        try:
            shard = torch.load(path, mmap=True, weights_only=True)
        except Exception as error:
            raise ValueError(f"--out {out}: {path.name} is unreadable ({type(error).__name__}): "
                             f"delete it, or pass a new --out") from None
        old = {k: shard.get(k, v) for k, v in settings.items()}
        if old != settings:
            raise ValueError(f"--out {out} has shards made with {old}, not {settings}: use a new one")
    tok = tok.to(device)
    encode = tok.encode_moments if tok.kind == "kl16" else tok.encode_latent
    for s in range(rank, num_shards, world_size):
        path = out / f"shard_{s:05d}.pt"
        if path.exists():
            log(f"shard {s + 1}/{num_shards} already done, skipping")
            continue
        index = torch.arange(s * shard_size, min(len(data), (s + 1) * shard_size))
        subset = torch.utils.data.Subset(data, index.tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size, num_workers=num_workers,
                                             pin_memory=torch.device(device).type == "cuda")
        features = []
        labels = []
        for x, y in loader:
            x = x.to(device)  # (B, 3, S, S)
            with torch.no_grad():
                pair = [encode(x), encode(x.flip(dims=[3]))]
            features.append(torch.stack(pair, dim=1).float().cpu())  # (B, 2, K, h, w)
            labels.append(y)
        shard = dict(settings, shard=s, x=torch.cat(features), labels=torch.cat(labels), index=index)
        # atomic: a killed run never leaves a half-written shard behind
        torch.save(shard, path.with_suffix(f".tmp{rank}"))
        os.replace(path.with_suffix(f".tmp{rank}"), path)
        log(f"shard {s + 1}/{num_shards}: {len(index)} images -> {path}")


class CachedLatents(torch.utils.data.Dataset):
    """Shards -> (tokens (L, C) float32, label int64): image or flip at random and, for KL-16,
    a posterior sample (official training); or sample=False, flip=False."""
    def __init__(self, root, sample=True, flip=True):
        self.files = sorted(Path(root).glob("shard_*.pt"))
        if not self.files:
            raise FileNotFoundError(f"no shard_*.pt in {root}: make them with python tokenizer.py cache")
        self.shards = self.open()
        first = self.shards[0]
        missing = sorted(set(range(first["num_shards"])) - {shard["shard"] for shard in self.shards})[:5]
        if missing or any(shard["kind"] != first["kind"] for shard in self.shards):
            raise ValueError(f"cache in {root} is mixed or incomplete (shards {missing} missing): "
                             f"rerun its python tokenizer.py cache")
        self.kind = first["kind"]
        self.img_size = first["img_size"]
        self.sample = sample
        self.flip = flip
        self.scale = KL16VAE.scale if self.kind == "kl16" else DCAE.scale  # the tokenizer's
        self.offsets = np.cumsum([0] + [len(shard["labels"]) for shard in self.shards])

    def open(self):  # memory-mapped: read on access, shared by forked workers
        return [torch.load(file, mmap=True, weights_only=True) for file in self.files]

    def __getstate__(self):  # spawned workers re-open the files (no tensors pickled)
        return dict(self.__dict__, shards=None)

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        if self.shards is None:
            self.shards = self.open()
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        j = i - int(self.offsets[s])
        # horizontal flips, in latent space
        flip = int(torch.rand(()) < 0.5) if self.flip else 0
        x = self.shards[s]["x"][j, flip].float()[None]  # (1, K, h, w)
        if self.kind == "kl16":
            posterior = DiagonalGaussianDistribution(x)
            x = posterior.sample() if self.sample else posterior.mode()
        return patchify(x * self.scale)[0], self.shards[s]["labels"][j].long()  # (L, C), ()


# ---- Command line. A leaf file: the value types and DDP set-up are copies of cli.py's
def positive_int(text):
    """A count: steps, K, batch sizes, images."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count: pass an integer >= 1")
    return value


def nonnegative_int(text):
    """A seed, or an interval where 0 means never."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: pass an integer >= 0")
    return value


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device


def setup_distributed():
    """DiT's set-up, made optional: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain python is one process."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # the GPU of this process on its node (not the global rank)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return Distributed(rank, world_size, device)


def run_cache(args):
    # Setup DDP: each rank checks the flags, then writes its own shards
    distributed = setup_distributed()
    tok = load_tokenizer(args.tokenizer, args.vae)
    cache_latents(args.data_path, args.out, tok, img_size=args.img_size, batch_size=args.batch_size,
                  shard_size=args.shard_size, num_workers=args.num_workers, rank=distributed.rank,
                  world_size=distributed.world_size, device=distributed.device)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cache = commands.add_parser("cache", help="ImageFolder -> latent shards")
    cache.add_argument("--data-path", required=True, help="DIR/<class>/<image>")
    cache.add_argument("--out", required=True, help="folder of shard_XXXXX.pt (reruns skip done ones)")
    cache.add_argument("--vae", required=True, help="kl16.ckpt, or a diffusers DC-AE folder")
    cache.add_argument("--tokenizer", default="kl16", choices=["kl16", "dcae"])
    defaults = cache_latents.__kwdefaults__  # the defaults live in one place
    cache.add_argument("--img-size", type=positive_int, default=defaults["img_size"],
                       help="256 for KL-16, 512 for DC-AE (the paper)")
    cache.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"])
    cache.add_argument("--shard-size", type=positive_int, default=defaults["shard_size"],
                       help="ImageNet, KL-16: 129 shards of 650 MB")
    cache.add_argument("--num-workers", type=nonnegative_int, default=defaults["num_workers"])
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_cache(args)
    except (ValueError, FileNotFoundError) as error:
        message = " ".join(str(error).split())
        parser.exit(2, f"{parser.prog}: error: {message}\n")


if __name__ == "__main__":
    main()
