"""
FID and Inception Score exactly as torch-fidelity computes them (28x28 data: small_metric.py).

eMIGM (arXiv 2503.07197, Sec. 5) reports FID-50K and IS on ImageNet as MAR does: 50 000 uint8
samples through torch-fidelity (LTH14's fork) against {mu, sigma} of ADM's reference batch.
Here offline, without torch-fidelity or torchvision: TF's inception-2015-12-05 graph as
torch-fidelity and pytorch-fid port it (either file of WEIGHT_URLS), their preprocessing, the
Frechet distance (Heusel et al. 2017) and the Inception Score (Salimans et al. 2016).
Run (without --inception, torch hub's checkpoint folder is searched for either weight file):
  python fid.py SAMPLES.npz --ref REF.npz --inception weights-inception-2015-12-05-6726825d.pth
  python fid.py stats VIRTUAL_imagenet256_labeled.npz --out ref_stats.npz --inception PATH
(the first prints FID and IS; the second writes reference statistics, also of a folder)
"""
import argparse
import contextlib
import math
import os
import sys
import tempfile
import zipfile

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

INPUT_SIZE = 299  # the TF graph's input resolution
POOL_FEATURES = 2048  # TF's pool_3, the FID feature
NUM_LOGITS = 1008  # the TF graph's softmax: 1000 ImageNet classes + 8 unused; all enter IS
WEIGHT_URLS = [
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
]

# ---- The FID Inception-v3: torchvision's Inception3 with pytorch-fid's FID blocks ----
def tf1_source_pixels(in_size, out_size, device):
    """TF1 reads output pixel i at i * in/out in float32 (F.interpolate's half-pixel offset: ~1-3% in pool_3)."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32, device=device)
    source = torch.arange(out_size, device=device) * scale
    lower = source.long()  # floor, as source >= 0
    upper = (lower + 1).clamp_max(in_size - 1)
    return lower, upper, source - lower.float()

def resize_tf1(x, size=INPUT_SIZE):
    """TF 1.x resize_bilinear as torch-fidelity's bit-exact 'slow' path. x: (B, C, H, W) float32."""
    y_lower, y_upper, y_weight = tf1_source_pixels(x.shape[2], size, x.device)
    x_lower, x_upper, x_weight = tf1_source_pixels(x.shape[3], size, x.device)
    top = x[:, :, y_lower]  # (B, C, size, W)
    bottom = x[:, :, y_upper]
    # interpolate in x first, then in y, as TF does
    top = top[..., x_lower] + (top[..., x_upper] - top[..., x_lower]) * x_weight
    bottom = bottom[..., x_lower] + (bottom[..., x_upper] - bottom[..., x_lower]) * x_weight
    return top + (bottom - top) * y_weight.view(size, 1)  # (B, C, size, size)

def fid_avg_pool(x):
    """TF's 3x3 average pool leaves the padding out (torchvision's: ~4% in pool_3)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

class BasicConv2d(nn.Module):
    """Conv without bias, BatchNorm with TF's eps 1e-3 (1e-5: ~2% in pool_3), ReLU."""
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)

class InceptionA(nn.Module):
    """Mixed_5b, 5c, 5d (35x35): 1x1, 5x5, double 3x3 and average-pooled branches."""
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(fid_avg_pool(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)

class InceptionB(nn.Module):
    """Mixed_6a, the grid reduction 35x35 -> 17x17."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)

class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17): the 7x7 convs factorised into 1x7 and 7x1."""
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(fid_avg_pool(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)

class InceptionD(nn.Module):
    """Mixed_7a, the grid reduction 17x17 -> 8x8."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)

class InceptionE(nn.Module):
    """Mixed_7b, 7c (8x8); pool 'avg' in 7b, 'max' in 7c (pytorch-fid's FIDInceptionE_2)."""
    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.pool == "max":
            branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            branch_pool = fid_avg_pool(x)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)

class InceptionV3(nn.Module):
    """No aux head, no dropout, no transform_input; eval mode, gradients off."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(POOL_FEATURES, NUM_LOGITS)
        self.has_logits = True  # False for pytorch-fid's wrapper layout, which has no fc
        self.eval()
        self.requires_grad_(False)

    def forward(self, images):
        """images: uint8 (B, 3, H, W) -> pool_3 (B, 2048), logits (B, 1008) or None."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3 expects uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        # torch-fidelity's: the TF1 resize, then the graph's (x - 128) * 0.0078125
        x = resize_tf1(images.float(), INPUT_SIZE)  # (B, 3, 299, 299)
        x = (x - 128) / 128
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5b(x)  # (B, 256, 35, 35)
        x = self.Mixed_5c(x)  # (B, 288, 35, 35)
        x = self.Mixed_5d(x)  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6b(x)  # (B, 768, 17, 17)
        x = self.Mixed_6c(x)  # (B, 768, 17, 17)
        x = self.Mixed_6d(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(x)  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7b(x)  # (B, 2048, 8, 8)
        x = self.Mixed_7c(x)  # (B, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048): TF's pool_3
        if not self.has_logits:
            return pool, None
        # IS takes TF's logits/MatMul: fc without bias (torch-fidelity, ADM)
        return pool, pool.mm(self.fc.weight.T)  # (B, 2048), (B, 1008)

# ---- Weights: two files of one port (same hash); pytorch-fid's wrapper saves blocks.i.j ----
WRAPPER_BLOCKS = [
    ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"],
    ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
    ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
    ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
]

def read_torch(path, what):
    """torch.load, weights only; a corrupt file is a one-line ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a readable {what} ({type(error).__name__})") from None

def load_inception(path=None, device=None):
    """InceptionV3 of a released file or a pytorch-fid wrapper (no fc: FID only)."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    candidates = [os.path.join(hub, url.split("/")[-1]) for url in WEIGHT_URLS]
    if path is not None:
        candidates = [os.fspath(path)]
    found = [file for file in candidates if os.path.isfile(file)]
    if not found:
        raise FileNotFoundError(f"{candidates[0]}: no such file; download {' or '.join(WEIGHT_URLS)} (--inception)")
    state = read_torch(found[0], "Inception weights file")
    if not isinstance(state, dict):
        raise ValueError(f"{found[0]}: not a state dict but a {type(state).__name__}")
    renamed = {}
    for key, value in state.items():
        parts = str(key).split(".")
        if parts[0] == "blocks":
            key = ".".join([WRAPPER_BLOCKS[int(parts[1])][int(parts[2])]] + parts[3:])
        renamed[key] = value
    model = InceptionV3()
    # not strict: the released files lack num_batches_tracked, the wrapper lacks fc
    try:
        missing, unexpected = model.load_state_dict(renamed, strict=False)
    except RuntimeError as error:
        shapes = "; ".join(str(error).split("\n\t")[1:])  # torch's lines, one per key
        raise ValueError(f"{found[0]}: not an FID Inception-v3: {shapes}") from None
    missing = sorted(key for key in missing if not key.endswith("num_batches_tracked"))
    if unexpected or missing not in ([], ["fc.bias", "fc.weight"]):
        keys = f"{len(missing)} missing keys {missing[:2]}, {len(unexpected)} unexpected"
        raise ValueError(f"{found[0]}: not an FID Inception-v3 state dict ({keys})")
    model.has_logits = missing == []
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device)

# ---- Images in, features and statistics out ----
def check_images(images, channels=(1, 3)):
    """uint8 (N, H, W) or (N, H, W, C) -> (N, H, W, C)."""
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images in 0..255, got {images.dtype}; convert with "
                         "np.round(np.clip(x * 255, 0, 255)).astype(np.uint8)")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in channels or len(images) == 0:
        raise ValueError(f"expected uint8 NHWC images with {' or '.join(map(str, channels))} "
                         f"channel(s), got shape {tuple(images.shape)}")
    return images

def open_images(source, batch_size):
    """{'count': N, 'batches': uint8 (b, H, W, C)} of an array, an .npz or a folder."""
    if not isinstance(source, (str, os.PathLike)):
        images = check_images(np.asarray(source))
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        return {"count": len(images), "batches": batches}
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    if not os.path.isdir(source):
        return read_npz(source, batch_size)
    # a folder as torch-fidelity reads it: sorted by real path (IS depends on the order), RGB
    names = [name for name in os.listdir(source) if name.endswith((".png", ".jpg", ".jpeg"))]
    files = sorted(os.path.realpath(os.path.join(source, name)) for name in names)
    if not files:
        raise ValueError(f"{source}: no .png/.jpg/.jpeg images (class folders: data.py --data-path DIR --out X.npz)")
    chunks = (files[i:i + batch_size] for i in range(0, len(files), batch_size))
    batches = (read_images(chunk, source) for chunk in chunks)
    return {"count": len(files), "batches": batches}

def read_images(files, source):
    """uint8 (b, H, W, 3) of image files; an unreadable one or another size is a one-line error."""
    from PIL import Image
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB")))
        except OSError as error:  # PIL's UnidentifiedImageError, a truncated file
            raise ValueError(f"{source}: cannot read {file} ({error}): remove or replace it") from None
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{source}: {file} is {images[-1].shape[1]}x{images[-1].shape[0]}, "
                             f"{files[0]} {images[0].shape[1]}x{images[0].shape[0]}: one size per folder")
    return np.stack(images)

def read_npz(path, batch_size):
    """arr_0 streamed as ADM's evaluator reads it (50 000 samples at 512 px are 39 GB)."""
    try:
        archive = zipfile.ZipFile(path)
        member = archive.open("arr_0.npy")
        read_header = np.lib.format.read_array_header_1_0
        if np.lib.format.read_magic(member) != (1, 0):
            read_header = np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(member)
        if fortran_order:
            return open_images(np.lib.format.read_array(archive.open("arr_0.npy")), batch_size)
    except Exception as error:
        raise ValueError(f"{path}: not an .npz with arr_0 ({type(error).__name__})") from None
    # dtype and shape checked from the header, before any image is read
    image_shape = check_images(np.broadcast_to(np.zeros((), dtype), shape)).shape[1:]  # (H, W, C)

    def batches():
        with archive, member:
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                data = member.read(count * math.prod(image_shape))
                yield np.frombuffer(data, np.uint8).reshape((count,) + image_shape)
    return {"count": shape[0], "batches": batches()}

@torch.no_grad()
def extract_features(images, model, batch_size=64, progress=True):
    """{'pool': (N, 2048), 'logits': (N, 1008) or None} on the model's device."""
    images = open_images(images, batch_size)
    device = next(model.parameters()).device
    pools = []
    logits = []
    total = math.ceil(images["count"] / batch_size)
    for batch in tqdm(images["batches"], total=total, disable=not progress, desc="inception"):
        if batch.shape[-1] == 1:  # grey -> RGB, as PIL's convert('RGB')
            batch = np.repeat(batch, 3, axis=-1)
        pool, logit = model(torch.tensor(batch, device=device).permute(0, 3, 1, 2))
        pools.append(pool.cpu())
        if model.has_logits:
            logits.append(logit.cpu())
    logits = torch.cat(logits).numpy() if model.has_logits else None
    return {"pool": torch.cat(pools).numpy(), "logits": logits}

def feature_statistics(features):
    """{mu, sigma} float64 of features (N, D): the float32 mean, the unbiased covariance."""
    if len(features) < 2:
        raise ValueError(f"a covariance needs 2 images or more, got {len(features)}")
    return {"mu": np.mean(features, axis=0).astype(np.float64), "sigma": np.cov(features, rowvar=False)}

def compute_statistics(images, model=None, batch_size=64, device=None, progress=True):
    """{mu (2048,), sigma (2048, 2048)} float64 of images, an .npz or a folder."""
    if model is None:
        model = load_inception(device=device)
    return feature_statistics(extract_features(images, model, batch_size, progress)["pool"])

def load_statistics(path, model=None, batch_size=64, device=None):
    """{mu, sigma} float64 of an .npz (ours, pytorch-fid's, ADM's, the fork's) or .pt, else of its images."""
    stats = None
    try:
        if str(path).endswith((".pt", ".pth")):
            # torch-fidelity's: a pickled dict of numpy arrays; allow just that
            dtypes = [type(np.dtype("f4")), type(np.dtype("f8"))]
            numpy_globals = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype] + dtypes
            with torch.serialization.safe_globals(numpy_globals):
                stats = torch.load(path, map_location="cpu", weights_only=True)
        elif os.path.isfile(path):
            with np.load(path) as npz:
                if "mu" in npz.files:
                    stats = {"mu": npz["mu"], "sigma": npz["sigma"]}
        if stats is not None:
            stats = {name: np.asarray(stats[name], np.float64) for name in ["mu", "sigma"]}
    except Exception as error:
        raise ValueError(f"{path}: not a statistics file ({type(error).__name__})") from None
    if stats is None:
        return compute_statistics(path, model, batch_size, device)
    if stats["mu"].ndim != 1 or stats["sigma"].shape != stats["mu"].shape * 2:
        raise ValueError(f"{path}: expected mu (D,), sigma (D, D), got {stats['mu'].shape}, {stats['sigma'].shape}")
    return stats

def save_statistics(stats, path):
    """{mu, sigma} float64 to an .npz via a temporary file: a failed write keeps the old."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path = path + ".npz"
    temporary = f"{path[:-len('.npz')]}.{os.getpid()}.tmp.npz"
    mu = np.asarray(stats["mu"], np.float64)
    np.savez_compressed(temporary, mu=mu, sigma=np.asarray(stats["sigma"], np.float64))
    os.replace(temporary, path)
    return path

def check_writable(path):
    """Create path's folder and a file there, so that a bad output fails now."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise ValueError(f"{path}: cannot write there ({type(error).__name__})") from None

# ---- The metrics: Frechet distance and Inception Score ----
def frechet_distance(mu1, sigma1, mu2, sigma2, method="eigvals"):
    """FID (Heusel et al. 2017), in float64: float32 is ~3e-4 off.
    'eigvals': torch-fidelity 0.4, LTH14's fork (eMIGM); 'sqrtm': torch-fidelity 0.3, ADM."""
    mu1 = np.asarray(mu1, np.float64)
    mu2 = np.asarray(mu2, np.float64)
    sigma1 = np.asarray(sigma1, np.float64)
    sigma2 = np.asarray(sigma2, np.float64)
    if method == "eigvals":
        # the real parts of the complex roots of eig(sigma1 sigma2): tiny negative eigenvalues
        # add ~0, not NaN; no eps (the fork takes |mu1 - mu2|^2 in float32: ~1e-7 apart)
        eigenvalues = np.linalg.eigvals(sigma1.dot(sigma2)).astype(np.complex128)
        tr_covmean = np.sum(np.sqrt(eigenvalues).real)
    elif method == "sqrtm":
        # retried with 1e-6 on the diagonals if not finite; imaginary parts < 1e-3 dropped
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(len(mu1)) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm: imaginary component {np.abs(covmean.imag).max():.3g}")
        tr_covmean = np.trace(covmean.real)
    else:
        raise ValueError(f"method must be 'eigvals' or 'sqrtm', got {method!r}")
    # |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)

def inception_score(logits, splits=10, shuffle=True):
    """IS (Salimans et al. 2016) = exp(E_x KL(p(y|x) || p(y))) as torch-fidelity takes it."""
    logits = torch.as_tensor(np.asarray(logits))
    n = len(logits)
    if logits.ndim != 2 or n < splits:
        raise ValueError(f"expected logits (N >= {splits}, C), got {tuple(logits.shape)}")
    if shuffle:
        logits = logits[np.random.RandomState(2020).permutation(n)]
    logits = logits.double()
    p = logits.softmax(dim=1)  # p(y|x), (N, classes)
    log_p = logits.log_softmax(dim=1)
    scores = []
    # split i: rows [i N // splits, (i + 1) N // splits) of a RandomState(2020) permutation
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        p_y = p[rows].mean(dim=0, keepdim=True)  # (1, classes)
        kl = (p[rows] * (log_p[rows] - torch.log(p_y))).sum(dim=1)  # (rows,)
        scores.append(kl.mean().exp().item())
    # the population std, as torch-fidelity's np.std
    return float(np.mean(scores)), float(np.std(scores))

def compute_metrics(samples, ref, model=None, batch_size=64, device=None, method="eigvals", progress=True):
    """FID and IS of samples against ref ({mu, sigma} or a path)."""
    if model is None:
        model = load_inception(device=device)
    if not isinstance(ref, dict):
        ref = load_statistics(ref, model, batch_size)
    features = extract_features(samples, model, batch_size, progress)
    stats = feature_statistics(features["pool"])
    distance = frechet_distance(stats["mu"], stats["sigma"], ref["mu"], ref["sigma"], method)
    metrics = {"fid": distance, "n": len(features["pool"])}
    # IS needs the fc layer, and N >= torch-fidelity's 10 splits
    if features["logits"] is not None and len(features["logits"]) >= 10:
        score_mean, score_std = inception_score(features["logits"])
        metrics["inception_score_mean"] = score_mean
        metrics["inception_score_std"] = score_std
    return metrics

# ---- Command line ----
def positive_int(text):
    """A count: steps, K, batch sizes, images."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count: pass an integer >= 1")
    return value

def torch_device(text):
    """A device torch can allocate on here: cpu, cuda, cuda:1."""
    try:
        torch.empty(0, device=torch.device(text))
    except Exception as error:
        raise argparse.ArgumentTypeError(f"{text} is not usable here ({type(error).__name__})")
    return text

def build_parser(stats=False):
    """`fid.py SAMPLES --ref REF` or `fid.py stats SOURCE --out OUT`."""
    parser = argparse.ArgumentParser(prog="fid.py stats" if stats else "fid.py",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("images", metavar="SOURCE" if stats else "SAMPLES",
                        help=".npz with arr_0 (uint8 NHWC) or a folder of png/jpg images")
    if stats:
        parser.add_argument("--out", required=True, help="output .npz: mu, sigma (float64)")
    else:
        parser.add_argument("--ref", required=True, help="stats .npz/.pt, ADM batch or folder")
        parser.add_argument("--method", default="eigvals", choices=["eigvals", "sqrtm"],
                            help="eigvals: torch-fidelity 0.4 (eMIGM); sqrtm: pytorch-fid, ADM")
    parser.add_argument("--inception", help="weights file of torch-fidelity or pytorch-fid")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="torch-fidelity's")
    parser.add_argument("--device", type=torch_device, help="default: cuda if available")
    return parser

@contextlib.contextmanager
def flag(name):
    """The flag's name before the user errors raised inside."""
    try:
        yield
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{name} {error}") from None
    except ValueError as error:
        raise ValueError(f"{name} {error}") from None

def run(args, stats):
    """Inputs opened, the output checked, then the network run."""
    with flag("SOURCE" if stats else "SAMPLES"):
        if open_images(args.images, args.batch_size)["count"] < 2:
            raise ValueError(f"{args.images}: 1 image; a covariance needs 2")
    if stats:
        out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # as numpy does
        with flag("--out"):
            check_writable(out)
            # it replaces only an old statistics file (never images)
            names = []
            if zipfile.is_zipfile(out):
                with zipfile.ZipFile(out) as archive:
                    names = sorted(archive.namelist())
            if os.path.exists(out) and names != ["mu.npy", "sigma.npy"]:
                raise ValueError(f"{out} exists, not a statistics file: pass another path")
    elif not os.path.exists(args.ref):
        raise FileNotFoundError(f"--ref {args.ref}: no such file or folder")
    with flag("--inception"):
        model = load_inception(args.inception, args.device)
    if stats:
        path = save_statistics(compute_statistics(args.images, model, args.batch_size), out)
        print(f"saved mu, sigma (float64) to {path}")
        return
    with flag("--ref"):
        ref = load_statistics(args.ref, model, args.batch_size)
        if ref["mu"].shape != (POOL_FEATURES,):
            raise ValueError(f"{args.ref}: mu has {len(ref['mu'])} features, not {POOL_FEATURES}")
    metrics = compute_metrics(args.images, ref, model, args.batch_size, method=args.method)
    print(f"FID: {metrics['fid']:.4f}  ({metrics['n']} samples)")
    if "inception_score_mean" in metrics:
        print(f"IS: {metrics['inception_score_mean']:.4f} +- {metrics['inception_score_std']:.4f}")
    else:
        print("IS: n/a (it needs the fc layer and 10 samples)")

def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    stats = argv[:1] == ["stats"]
    parser = build_parser(stats)
    args = parser.parse_args(argv[1:] if stats else argv)
    try:
        run(args, stats)
    except (ValueError, FileNotFoundError) as error:
        message = " ".join(str(error).split())
        parser.exit(2, f"{parser.prog}: error: {message}\n")

if __name__ == "__main__":
    main()
