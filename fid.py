"""
FID and Inception Score exactly as torch-fidelity computes them, and an offline Frechet distance for 28x28 data.

eMIGM (arXiv 2503.07197) reports FID-50K and IS on ImageNet 256 and 512 (its experiments' tables) computed as MAR does:
50 000 uint8 samples through torch-fidelity (LTH14's fork, which adds a `fid_statistics_file`) against {mu, sigma} from
ADM's reference batch. This file gives those numbers from local files, without torch-fidelity, torchvision or network:
  * InceptionV3: the TF `inception-2015-12-05` graph as ported by pytorch-fid / torch-fidelity, loading either public
    weight file; torch-fidelity's preprocessing (uint8, TF1 bilinear resize to 299, (x - 128) / 128); pool_3 (2048-d)
    features for FID, bias-free 1008-way logits for IS.
  * frechet_distance (float64), inception_score (10 splits), statistics {mu, sigma} (float64) of an ADM-style .npz
    (arr_0, uint8 NHWC) or an image folder; reads ADM's VIRTUAL_imagenet256_labeled.npz, the fork's stats files (their
    float32 mu is cast for you) and torch-fidelity's cached .pt statistics.
  * SmallDataMetric: for 28x28 data without Inception weights, a small CNN trained once on the train split gives
    features for a Frechet distance and the accuracy of class-conditional samples. NOT comparable with Inception FID.

Run (--batch-size, --device; without --inception, torch hub's checkpoint folder is searched for either weight file):
  python fid.py SAMPLES.npz --ref REF.npz --inception weights-inception-2015-12-05-6726825d.pth   # prints FID and IS
  python fid.py stats VIRTUAL_imagenet256_labeled.npz --out ref_stats.npz --inception PATH       # or an image folder
"""
import argparse
import contextlib
import hashlib
import math
import os
import sys
import time
import zipfile

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

INPUT_SIZE = 299                # the TF graph's input resolution
NUM_LOGITS = 1008               # the TF graph's softmax: 1000 ImageNet classes + 8 unused; all 1008 enter IS
IS_SPLITS, IS_SEED = 10, 2020   # torch-fidelity's defaults: splits, and the RandomState seed of its row shuffle
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')   # what torch-fidelity picks up in a folder (not recursive)
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
WEIGHT_URLS = {  # one port of the TF graph under two names (same hash suffix): torch-fidelity's, pytorch-fid's
    'weights-inception-2015-12-05-6726825d.pth':
        'https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth',
    'pt_inception-2015-12-05-6726825d.pth':
        'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth'}
# pytorch-fid's InceptionV3 wrapper saves the same modules as blocks.i.j.* (and no fc): blocks.i.j -> our name
WRAPPER_NAMES = {f'blocks.{i}.{j}': name for i, names in enumerate([
    ['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3'], ['Conv2d_3b_1x1', 'Conv2d_4a_3x3'],
    ['Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d', 'Mixed_6e'],
    ['Mixed_7a', 'Mixed_7b', 'Mixed_7c']]) for j, name in enumerate(names)}


# --- Preprocessing: torch-fidelity's TF1-compatible bilinear resize --------------------------------------------------

def resize_tf1(x, size=INPUT_SIZE):
    """TF 1.x resize_bilinear(align_corners=False) as torch-fidelity's interpolate_compat_tensorflow ('slow' gather
    path, bit-exact to TF on CPU): output pixel i reads source coordinate i * in/out, with no half-pixel offset
    (F.interpolate reads (i + 0.5) * in/out - 0.5: ~1-3% off in pool_3) and no antialiasing. x: (B, C, H, W) float32."""
    def grid(n_in):
        scale = torch.tensor(n_in / size, dtype=torch.float32, device=x.device)  # Python-float scale, float32 product
        src = torch.arange(size, device=x.device) * scale                        # (size,)
        lo = src.long()                                                          # floor, as src >= 0
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo.float()
    y_lo, y_hi, dy = grid(x.shape[2])
    x_lo, x_hi, dx = grid(x.shape[3])
    top, bottom = x[:, :, y_lo], x[:, :, y_hi]                            # (B, C, size, W)
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx         # in x first, then in y
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
    return top + (bottom - top) * dy.view(size, 1)                        # (B, C, size, size)


# --- The FID Inception-v3 (module names = torchvision Inception3 = torch-fidelity = pytorch-fid's fid_inception_v3) --

class BasicConv2d(nn.Module):
    """Conv without bias -> BatchNorm with TF's eps 1e-3 (torchvision's 1e-5 moves pool_3 by ~2%) -> ReLU."""
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def conv1x7(cin, cout):
    return BasicConv2d(cin, cout, (1, 7), padding=(0, 3))


def conv7x1(cin, cout):
    return BasicConv2d(cin, cout, (7, 1), padding=(3, 0))


def avg_pool_3x3(x):
    # TF's 3x3 SAME average pool leaves the padding out of the mean (torchvision counts it: ~4% change in pool_3)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d at 35x35: 1x1 | 1x1, 5x5 | 1x1, 3x3, 3x3 | avg pool, 1x1."""
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv2d(64, 96, 3, padding=1), BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a, 35x35 -> 17x17: 3x3/2 | 1x1, 3x3, 3x3/2 | max pool 3x3/2."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv2d(64, 96, 3, padding=1), BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e at 17x17: 1x1 | 1x1, 1x7, 7x1 | 1x1, 7x1, 1x7, 7x1, 1x7 | avg pool, 1x1."""
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = conv1x7(c7, c7), conv7x1(c7, 192)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = BasicConv2d(cin, c7, 1), conv7x1(c7, c7)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = conv1x7(c7, c7), conv7x1(c7, c7)
        self.branch7x7dbl_5 = conv1x7(c7, 192)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_2(self.branch7x7dbl_1(x))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(bd)))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a, 17x17 -> 8x8: 1x1, 3x3/2 | 1x1, 1x7, 7x1, 3x3/2 | max pool 3x3/2."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = BasicConv2d(cin, 192, 1), conv1x7(192, 192)
        self.branch7x7x3_3, self.branch7x7x3_4 = conv7x1(192, 192), BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c at 8x8: 1x1 | 1x1, (1x3 ; 3x1) | 1x1, 3x3, (1x3 ; 3x1) | pool, 1x1. The TF graph's Mixed_7c pools
    with a 3x3 *max* pool (a quirk every FID port keeps); Mixed_7b uses the average pool."""
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # 'avg' or 'max'
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 448, 1), BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = avg_pool_3x3(x) if self.pool == 'avg' else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3: no aux head, no dropout, no transform_input; eval mode, gradients off."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, 'avg'), InceptionE(2048, 'max')
        self.fc = nn.Linear(2048, NUM_LOGITS)
        self.has_logits = True  # False once loaded from pytorch-fid's wrapper layout, which has no fc (FID only)
        self.eval().requires_grad_(False)

    def forward(self, images):
        """images: uint8 (B, 3, H, W), any H, W -> pool_3 (B, 2048), bias-free logits (B, 1008) or None."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'InceptionV3 expects uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}')
        x = resize_tf1(images.float(), INPUT_SIZE)                          # (B, 3, 299, 299), still 0..255
        x = (x - 128) / 128                                                 # the graph's (x - 128) * 0.0078125
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                    # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                       # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                    # (B, 192, 35, 35)
        for block in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
            x = getattr(self, 'Mixed_' + block)(x)                          # 35 -> 17 (6a) -> 8 (7a): (B, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)                       # (B, 2048): TF's pool_3, the FID feature
        # IS takes TF's softmax/logits/MatMul, the fc *without* its bias (torch-fidelity's 'logits_unbiased'; ADM too)
        return pool, (pool.mm(self.fc.weight.T) if self.has_logits else None)   # (B, 2048), (B, 1008)


def load_inception(path=None, device=None):
    """InceptionV3 from a local file: torch-fidelity's or pytorch-fid's released weights (same layout; no BatchNorm
    num_batches_tracked) or pytorch-fid's wrapper layout (blocks.i.j.*, no fc: FID only). Without a path, torch hub's
    checkpoint folder is searched. Missing file, other keys or shapes: a one-line error."""
    candidates = [path] if path else [os.path.join(torch.hub.get_dir(), 'checkpoints', f) for f in WEIGHT_URLS]
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
        raise FileNotFoundError(f'Inception weights not found at {path or os.path.dirname(candidates[0])}; download '
                                f'{" or ".join(WEIGHT_URLS.values())} and pass its path (--inception)')
    state = torch.load(found[0], map_location='cpu', weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f'{found[0]}: expected a state dict, got {type(state).__name__}')
    def rename(key):  # pytorch-fid's wrapper layout: blocks.i.j.rest -> Mixed_xx.rest
        head = '.'.join(key.split('.')[:3])
        return WRAPPER_NAMES[head] + key[len(head):] if head in WRAPPER_NAMES else key
    state = {rename(k): v for k, v in state.items()}
    model = InceptionV3()
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    given = {k: v.shape for k, v in state.items() if not k.endswith('num_batches_tracked')}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing == ['fc.bias', 'fc.weight']:
        model.has_logits, missing = False, []
    wrong = [f'{k} {tuple(v)} != {tuple(expected[k])}' for k, v in given.items() if k in expected and v != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(f'{found[0]}: not an FID Inception-v3 state dict ({len(missing)} missing keys {missing[:2]}, '
                         f'{len(unexpected)} unexpected {unexpected[:2]}, {len(wrong)} wrong shapes {wrong[:1]})')
    model.load_state_dict(state, strict=False)
    return model.to(device or DEVICE)


# --- Images in, features and statistics out -------------------------------------------------------------------------

def check_images(images, channels=(1, 3)):
    """images uint8 (N, H, W) or (N, H, W, C), C in channels -> (N, H, W, C); otherwise a one-line ValueError."""
    if images.dtype.kind == 'f' and np.isnan(images).any():
        raise ValueError('images contain NaN')
    if images.dtype != np.uint8:
        raise ValueError(f'expected uint8 images in 0..255, got {images.dtype}; '
                         'convert with np.round(np.clip(x * 255, 0, 255)).astype(np.uint8)')
    images = images[..., None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[-1] not in channels or len(images) == 0:
        raise ValueError(f'expected uint8 NHWC images with {" or ".join(map(str, channels))} channel(s), '
                         f'got shape {tuple(images.shape)}')
    return images


def image_batches(source, batch_size):
    """-> (N, iterator of uint8 (b, H, W, 3)) from an NHWC array, an .npz (arr_0) or a folder. A folder is read as
    torch-fidelity reads it: png/jpg/jpeg files in it, sorted by real path (IS depends on the order), PIL
    .convert('RGB'), no resize or crop."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        from PIL import Image
        files = sorted(os.path.realpath(os.path.join(source, f)) for f in os.listdir(source)
                       if f.endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f'{source}: no {"/".join(IMAGE_EXTENSIONS)} images')
        def load(chunk):
            arrays = [np.asarray(Image.open(f).convert('RGB')) for f in chunk]
            if len({a.shape for a in arrays}) > 1:
                raise ValueError(f'{source}: images of different sizes in one batch, e.g. {chunk[0]}')
            return np.stack(arrays)
        return len(files), (load(files[i:i + batch_size]) for i in range(0, len(files), batch_size))
    streamed = stream_npz(source, batch_size) if isinstance(source, (str, os.PathLike)) else None
    if streamed is None:
        if isinstance(source, (str, os.PathLike)):
            with np.load(source) as f:
                source = f['arr_0']
        images = check_images(np.asarray(source))
        streamed = len(images), (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    n, batches = streamed
    return n, (np.repeat(b, 3, axis=-1) if b.shape[-1] == 1 else b for b in batches)   # grey -> RGB, as PIL does


def stream_npz(path, batch_size):
    """(N, iterator of uint8 (b, H, W, C)) read from the .npz's arr_0 member batch by batch, as ADM's evaluator
    streams it (50 000 samples at 512 px are 39 GB); None if it cannot be streamed (not uint8 C-order: loaded whole)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f'{path}: not an .npz file') from None
    if 'arr_0.npy' not in archive.namelist():
        raise ValueError(f'{path}: no arr_0 (uint8 NHWC images) in this .npz; it has {", ".join(archive.namelist())}')
    member = archive.open('arr_0.npy')
    version = np.lib.format.read_magic(member)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    shape, fortran, dtype = read_header[version](member) if version in read_header else (None, True, None)
    if fortran or dtype != np.uint8:
        archive.close()
        return None
    n, shape = shape[0], check_images(np.broadcast_to(np.uint8(0), shape)).shape[1:]   # (H, W, C) or a one-line error
    def batches():
        with archive, member:
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                yield np.frombuffer(member.read(count * math.prod(shape)), np.uint8).reshape((count,) + shape)
    return n, batches()


@torch.no_grad()
def extract_features(images, model, batch_size=64, progress=True):
    """images (uint8 NHWC array, .npz or folder) -> pool_3 (N, 2048) float32, logits (N, 1008) float32 or None."""
    device = next(model.parameters()).device
    n, batches = image_batches(images, batch_size)
    pools, logits = [], []
    for batch in tqdm(batches, total=math.ceil(n / batch_size), disable=not progress, desc='inception', unit='batch'):
        pool, logit = model(torch.tensor(batch, device=device).permute(0, 3, 1, 2))   # (b, 3, H, W) uint8
        pools.append(pool.cpu())
        logits.append(logit.cpu() if model.has_logits else None)
    return torch.cat(pools).numpy(), (torch.cat(logits).numpy() if model.has_logits else None)


def feature_statistics(features):
    """{mu, sigma} float64 of features (N, D) float32; mu is the float32 mean as torch-fidelity and ADM take it,
    sigma = np.cov (float64, normalised by N - 1)."""
    if len(features) < 2:
        raise ValueError(f'need at least 2 images for a covariance, got {len(features)}')
    return {'mu': np.mean(features, axis=0).astype(np.float64), 'sigma': np.cov(features, rowvar=False)}


def compute_statistics(images, model=None, batch_size=64, device=None, progress=True):
    """FID statistics {mu (2048,), sigma (2048, 2048)} float64 of uint8 NHWC images, an .npz (arr_0) or a folder."""
    model = model if model is not None else load_inception(device=device)
    return feature_statistics(extract_features(images, model, batch_size, progress)[0])


def load_statistics(path, model=None, batch_size=64, device=None):
    """{mu, sigma} float64 from an .npz with mu/sigma (ours, pytorch-fid's, the fork's fid_statistics_file with its
    float32 mu, ADM's VIRTUAL_imagenet256_labeled.npz), torch-fidelity's cached stats (.pt), or computed from an .npz
    with only arr_0 (as ADM's evaluator does) or from an image folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return compute_statistics(path, model, batch_size, device)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'statistics file not found: {path}')
    if path.endswith(('.pt', '.pth')):   # a pickled dict of numpy arrays: allow exactly what that needs
        numpy_globals = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype('f4')), type(np.dtype('f8'))]
        with torch.serialization.safe_globals(numpy_globals):
            stats = torch.load(path, map_location='cpu', weights_only=True)
    else:
        with np.load(path) as f:
            if 'mu' not in f or 'sigma' not in f:
                return compute_statistics(path, model, batch_size, device)
            stats = {'mu': f['mu'], 'sigma': f['sigma']}
    mu, sigma = np.asarray(stats['mu'], np.float64), np.asarray(stats['sigma'], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f'{path}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}')
    return {'mu': mu, 'sigma': sigma}


def save_statistics(stats, path):
    np.savez_compressed(path, mu=np.asarray(stats['mu'], np.float64), sigma=np.asarray(stats['sigma'], np.float64))


# --- The metrics ----------------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, method='eigvals'):
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in float64.
    'eigvals' (torch-fidelity 0.4 and LTH14's fork, whose numbers eMIGM and MAR report): tr sqrt = sum of the real
    parts of the complex square roots of eig(sigma1 sigma2), so tiny negative eigenvalues of a near-singular product
    add ~0 instead of NaN; no eps. (The fork asserts equal dtypes, so with a float32 mu it takes |mu1 - mu2|^2 in
    float32; we take it in float64, ~1e-7 relative in that term.)
    'sqrtm' (torch-fidelity 0.3, pytorch-fid, ADM): scipy.linalg.sqrtm, retried with 1e-6 added to both diagonals if
    not finite; a diagonal imaginary part above 1e-3 raises, smaller ones are dropped."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    d = len(mu1)
    if mu1.ndim != 1 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f'shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}')
    if method == 'eigvals':
        tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1.dot(sigma2)).astype(np.complex128)).real)
    elif method == 'sqrtm':
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f'sqrtm: imaginary component {np.max(np.abs(covmean.imag)):.3g}')
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    else:
        raise ValueError(f"method must be 'eigvals' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits=IS_SPLITS, shuffle=True):
    """torch-fidelity's IS of logits (N, 1008): rows permuted by RandomState(2020), float64 softmax, split i = rows
    [i N // splits, (i + 1) N // splits), each scoring exp(mean KL(p(y|x) || p(y))) -> (mean, population std)."""
    logits = torch.as_tensor(np.asarray(logits))
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f'expected logits (N >= {splits}, classes), got {tuple(logits.shape)}')
    n = len(logits)
    logits = (logits[np.random.RandomState(IS_SEED).permutation(n)] if shuffle else logits).double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        rows = slice(i * n // splits, (i + 1) * n // splits)
        log_q = torch.log(p[rows].mean(dim=0, keepdim=True))              # log p(y) over the split, (1, classes)
        scores.append((p[rows] * (log_p[rows] - log_q)).sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def compute_metrics(samples, ref, model=None, batch_size=64, device=None, method='eigvals', progress=True):
    """{'fid', 'inception_score_mean', 'inception_score_std', 'n'} of samples (uint8 NHWC array, .npz or folder)
    against ref (a {mu, sigma} dict or anything load_statistics reads), in one pass over the samples."""
    model = model if model is not None else load_inception(device=device)
    ref = ref if isinstance(ref, dict) else load_statistics(ref, model, batch_size)
    pool, logits = extract_features(samples, model, batch_size, progress)
    stats = feature_statistics(pool)
    out = {'fid': frechet_distance(stats['mu'], stats['sigma'], ref['mu'], ref['sigma'], method), 'n': len(pool)}
    if logits is not None:
        out['inception_score_mean'], out['inception_score_std'] = inception_score(logits)
    return out


# --- Offline small-data metric (28x28, e.g. Fashion-MNIST): NOT comparable with Inception FID ------------------------

class SmallClassifier(nn.Module):
    """A small CNN for grey images; its ReLU penultimate layer (128-d) plays the role of Inception's pool_3.
    Strided convolutions: ~91% on Fashion-MNIST in 3 epochs, at a third of the cost of a conv + max-pool CNN."""
    def __init__(self, num_classes, img_size=28, width=32, feature_dim=128):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, width, 5, stride=2, padding=2), nn.BatchNorm2d(width), nn.ReLU(),             # (B, w, 14, 14)
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())  # (B, 2w, 7, 7)
        self.fc = nn.Linear(2 * width * math.ceil(img_size / 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images):  # images: uint8 (B, H, W)
        x = images.float().unsqueeze(1) / 127.5 - 1                  # (B, 1, H, W) in [-1, 1]
        features = F.relu(self.fc(self.convs(x).flatten(1)))         # (B, 128)
        return features, self.head(features)                         # (B, 128), (B, num_classes)


def box_blur3x3(images):
    """uint8 (N, H, W) -> the images through a 3x3 mean filter (at the border, the mean of the pixels inside)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).squeeze(1).round().byte().numpy()


@contextlib.contextmanager
def num_threads(n):
    # A net this small gains little from a 2nd thread, and with the 2nd core busy, OpenMP's barriers made each step
    # 10-25x slower here (measured). So the small metric runs on n threads, then the caller's setting comes back.
    previous = torch.get_num_threads()
    torch.set_num_threads(n or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class SmallDataMetric:
    """FD_small: the Frechet distance in a small CNN's 128-d features against the statistics of the train split it
    was fit on, and the CNN's accuracy on class-conditional samples. For 28x28 data without Inception weights.
    NOT comparable with Inception FID (another network, features and data): compare it only with itself at the same
    number of images N (its bias grows like 1/N) and with baselines(). The CNN is trained once (seeded; ~1 min of one
    core for Fashion-MNIST) and cached in cache_path under a hash of the train data and the recipe; other data or
    another recipe retrains and overwrites the file."""
    label = 'FD_small (small-CNN Frechet distance; not comparable with Inception FID)'

    def __init__(self, train_images, train_labels, cache_path, epochs=3, batch_size=128, lr=2e-3, seed=0,
                 threads=1, verbose=True):
        train_images = check_images(np.asarray(train_images), channels=(1,))[..., 0]      # (N, H, W)
        train_labels = np.asarray(train_labels).astype(np.int64)
        if train_labels.shape != (len(train_images),):
            raise ValueError(f'expected labels of shape ({len(train_images)},), got {train_labels.shape}')
        self.threads = threads
        recipe = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        digest = hashlib.sha256(repr(('SmallClassifier v1', sorted(recipe.items()), train_images.shape)).encode())
        digest.update(np.ascontiguousarray(train_images).tobytes())
        digest.update(train_labels.tobytes())
        with torch.random.fork_rng(devices=[]):   # a seeded init that leaves the caller's global RNG alone
            torch.manual_seed(seed)
            self.net = SmallClassifier(int(train_labels.max()) + 1, train_images.shape[1]).eval()
        cache = torch.load(cache_path, map_location='cpu', weights_only=True) if os.path.isfile(cache_path) else {}
        if cache.get('key') != digest.hexdigest():
            if verbose:
                print(f'SmallDataMetric: training the classifier on {len(train_images)} images -> {cache_path}')
            with num_threads(threads):
                seconds = self._train(train_images, train_labels, **recipe)
            stats = feature_statistics(self.features(train_images)[0])
            cache = {'key': digest.hexdigest(), 'model': self.net.state_dict(), 'train_seconds': seconds,
                     'mu': torch.from_numpy(stats['mu']), 'sigma': torch.from_numpy(stats['sigma'])}
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            torch.save(cache, cache_path)
        self.net.load_state_dict(cache['model'])
        self.train_seconds, self.mu, self.sigma = cache['train_seconds'], cache['mu'].numpy(), cache['sigma'].numpy()

    def _train(self, images, labels, epochs, batch_size, lr, seed):
        """Adam with a cosine decay to 0, batches shuffled by a seeded generator. Returns the seconds taken."""
        start, generator = time.time(), torch.Generator().manual_seed(seed)
        x, y = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        steps, step = epochs * math.ceil(len(x) / batch_size), 0
        self.net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=generator).split(batch_size):
                for group in opt.param_groups:
                    group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                loss = F.cross_entropy(self.net(x[idx])[1], y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        self.net.eval()
        return time.time() - start

    @torch.no_grad()
    def features(self, images, batch_size=1000):
        """uint8 (N, H, W) -> penultimate features (N, 128) float32, predicted classes (N,) int64."""
        images = check_images(np.asarray(images), channels=(1,))[..., 0]
        feats, preds = [], []
        with num_threads(self.threads):
            for i in range(0, len(images), batch_size):
                f, logits = self.net(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))
                feats.append(f)
                preds.append(logits.argmax(1))
        return torch.cat(feats).numpy(), torch.cat(preds).numpy()

    def evaluate(self, images, labels=None):
        """{'frechet': FD_small of the images against the train statistics, 'accuracy': share classified as labels}."""
        feats, preds = self.features(images)
        stats = feature_statistics(feats)
        out = {'frechet': frechet_distance(stats['mu'], stats['sigma'], self.mu, self.sigma)}
        if labels is not None:
            out['accuracy'] = float(np.mean(preds == np.asarray(labels)))
        return out

    def baselines(self, test_images, test_labels):
        """Real held-out data. 'floor' = FD_small between the two halves of the test images (two real sets of N/2: the
        noise floor); 'real_test' / 'blur3x3' = evaluate() of all N test images as they are / through a 3x3 box blur
        (a visibly degraded set); 'classifier_accuracy' = the CNN's accuracy on them (a ceiling for samples). Pass as
        many test images as you have samples, so that N, and with it the bias, is the same."""
        test_images = check_images(np.asarray(test_images), channels=(1,))[..., 0]
        half = len(test_images) // 2
        a, b = (feature_statistics(self.features(test_images[i * half:(i + 1) * half])[0]) for i in range(2))
        real = self.evaluate(test_images, test_labels)
        return {'floor': frechet_distance(a['mu'], a['sigma'], b['mu'], b['sigma']), 'real_test': real['frechet'],
                'blur3x3': self.evaluate(box_blur3x3(test_images))['frechet'],
                'classifier_accuracy': real['accuracy'],
                'train_seconds': self.train_seconds}


# --- Command line ---------------------------------------------------------------------------------------------------

def main(args):
    model = load_inception(args.inception, args.device)
    if args.command == 'stats':
        save_statistics(compute_statistics(args.source, model, args.batch_size), args.out)
        print(f'saved mu, sigma (float64) to {args.out}')
        return
    metrics = compute_metrics(args.samples, args.ref, model, args.batch_size, method=args.method)
    print(f"FID: {metrics['fid']:.4f}  ({metrics['n']} samples)")
    if 'inception_score_mean' in metrics:
        print(f"IS: {metrics['inception_score_mean']:.4f} +- {metrics['inception_score_std']:.4f}")
    else:
        print('IS: n/a (these weights have no fc layer)')


if __name__ == '__main__':
    command = 'stats' if sys.argv[1:2] == ['stats'] else 'metrics'
    parser = argparse.ArgumentParser(prog='fid.py' + (' stats' if command == 'stats' else ''), description=(
        'FID statistics of images' if command == 'stats' else 'FID and IS of samples, as torch-fidelity computes them'))
    if command == 'stats':
        parser.add_argument('source', help='.npz with arr_0 (uint8 NHWC) or a folder of png/jpg images')
        parser.add_argument('--out', required=True, help='output .npz with mu, sigma (float64)')
    else:
        parser.add_argument('samples', help='.npz with arr_0 (uint8 NHWC, e.g. 50 000 samples) or an image folder')
        parser.add_argument('--ref', required=True, help='stats .npz/.pt (mu, sigma), an ADM batch or a folder')
        parser.add_argument('--method', default='eigvals', choices=['eigvals', 'sqrtm'],
                            help="eigvals: torch-fidelity 0.4, LTH14's fork (eMIGM's numbers); sqrtm: pytorch-fid, ADM")
    parser.add_argument('--inception', default=None, help='Inception weights (torch-fidelity or pytorch-fid file)')
    parser.add_argument('--batch-size', type=int, default=64)   # torch-fidelity's default
    parser.add_argument('--device', default=DEVICE)
    args = parser.parse_args(sys.argv[2:] if command == 'stats' else sys.argv[1:])
    args.command = command
    try:
        main(args)
    except (ValueError, OSError) as error:   # the usual user errors: one line, no traceback
        sys.exit(f'fid.py: error: {error}')
