"""
FID and Inception Score exactly as torch-fidelity computes them, and an offline Frechet distance for 28x28 data.

eMIGM (arXiv 2503.07197) reports FID-50K and IS on ImageNet 256 and 512 as MAR does: 50 000 uint8 samples through
torch-fidelity (LTH14's fork, which adds a `fid_statistics_file`) against {mu, sigma} of ADM's reference batch. This
file gives those numbers from local files, without torch-fidelity, torchvision or network: the TF inception-2015-12-05
graph as torch-fidelity and pytorch-fid port it (either weight file, WEIGHT_URLS), their preprocessing, statistics and
metrics, and the statistics files of ADM, the fork and torch-fidelity. SmallDataMetric is for 28x28 data without
Inception weights (a small CNN); it is NOT comparable with Inception FID. Run (--batch-size, --device; without
--inception, torch hub's checkpoint folder is searched for either weight file):
  python fid.py SAMPLES.npz --ref REF.npz --inception weights-inception-2015-12-05-6726825d.pth   # prints FID and IS
  python fid.py stats VIRTUAL_imagenet256_labeled.npz --out ref_stats.npz --inception PATH       # or an image folder
"""
import argparse
import contextlib
import hashlib
import math
import os
import re
import sys
import time
import zipfile
from collections import OrderedDict

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

INPUT_SIZE = 299                # the TF graph's input resolution
NUM_LOGITS = 1008               # the TF graph's softmax: 1000 ImageNet classes + 8 unused; all 1008 enter IS
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def expect(condition, message, error=ValueError):   # the user errors: one line each, which the CLI prints
    if not condition:
        raise error(message)


# --- Preprocessing: torch-fidelity's TF1-compatible bilinear resize --------------------------------------------------
def resize_tf1(x, size=INPUT_SIZE):
    """TF 1.x resize_bilinear(align_corners=False) as torch-fidelity's interpolate_compat_tensorflow ('slow' gather
    path, bit-exact to TF on CPU): output pixel i reads source coordinate i * in/out, with no half-pixel offset
    (F.interpolate reads (i + 0.5) * in/out - 0.5: ~1-3% off in pool_3) and no antialiasing. x: (B, C, H, W) float32."""
    def grid(n_in):   # source coordinates (size,): the scale is a Python float, the product float32
        src = torch.arange(size, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32, device=x.device)
        lo = src.long()                                                          # floor, as src >= 0
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo.float()
    (y_lo, y_hi, dy), (x_lo, x_hi, dx) = grid(x.shape[2]), grid(x.shape[3])
    top, bottom = x[:, :, y_lo], x[:, :, y_hi]                            # (B, C, size, W)
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx         # in x first, then in y
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
    return top + (bottom - top) * dy.view(size, 1)                        # (B, C, size, size)


# --- The FID Inception-v3 (module names = torchvision Inception3 = torch-fidelity = pytorch-fid's fid_inception_v3) --
def basic_conv2d(cin, cout, kernel_size, stride=1, padding=0):
    """torchvision's BasicConv2d: conv, no bias -> BatchNorm with TF's eps 1e-3 (1e-5 moves pool_3 ~2%) -> ReLU."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False),
                                     bn=nn.BatchNorm2d(cout, eps=0.001), relu=nn.ReLU()))


POOLS = {  # TF's 3x3 SAME average pool leaves the padding out of the mean (torchvision counts it: ~4% change in pool_3)
    'avg': lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False),
    'max': lambda x: F.max_pool2d(x, 3, stride=1, padding=1),   # Mixed_7c: a quirk of the TF graph every FID port keeps
    'max/2': lambda x: F.max_pool2d(x, 3, stride=2)}             # the grid reductions Mixed_6a and Mixed_7a
SPLIT = ((384, (1, 3)), (384, (3, 1)))   # Mixed_7b/7c: a 1x3 and a 3x1 conv on the same input, concatenated
# torchvision's InceptionA..E as {branch: [pool (optional), conv (cout, kernel[, 2]), ...]}, in its order (key order);
# MIXED: the blocks in order, as name: (in channels, block, c) with c A's pool features, C's c7 or E's pool.
BLOCKS = {
    'A': lambda c: {'branch1x1': [(64, 1)], 'branch5x5': [(48, 1), (64, 5)],                                # 35x35
                    'branch3x3dbl': [(64, 1), (96, 3), (96, 3)], 'branch_pool': ['avg', (c, 1)]},
    'B': lambda c: {'branch3x3': [(384, 3, 2)], 'branch3x3dbl': [(64, 1), (96, 3), (96, 3, 2)], 'pool': ['max/2']},
    'C': lambda c: {'branch1x1': [(192, 1)], 'branch7x7': [(c, 1), (c, (1, 7)), (192, (7, 1))],             # 17x17
                    'branch7x7dbl': [(c, 1), (c, (7, 1)), (c, (1, 7)), (c, (7, 1)), (192, (1, 7))],
                    'branch_pool': ['avg', (192, 1)]},
    'D': lambda c: {'branch3x3': [(192, 1), (320, 3, 2)],                                                   # 17 -> 8
                    'branch7x7x3': [(192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2)], 'pool': ['max/2']},
    'E': lambda c: {'branch1x1': [(320, 1)], 'branch3x3': [(384, 1), SPLIT],                                # 8x8
                    'branch3x3dbl': [(448, 1), (384, 3), SPLIT], 'branch_pool': [c, (192, 1)]}}
MIXED = {'Mixed_5b': (192, 'A', 32), 'Mixed_5c': (256, 'A', 64), 'Mixed_5d': (288, 'A', 64), 'Mixed_6a': (288, 'B', 0),
         'Mixed_6b': (768, 'C', 128), 'Mixed_6c': (768, 'C', 160), 'Mixed_6d': (768, 'C', 160),
         'Mixed_6e': (768, 'C', 192), 'Mixed_7a': (768, 'D', 0), 'Mixed_7b': (1280, 'E', 'avg'),
         'Mixed_7c': (2048, 'E', 'max')}


class Mixed(nn.Module):
    """An Inception block (one of BLOCKS): its branches run side by side on x, concatenated on channels. The convs get
    torchvision's names: the branch's for a lone conv, else branch_1, branch_2, ..., branch_2a and branch_2b (SPLIT)."""
    def __init__(self, cin, branches):
        super().__init__()
        self.branches = []   # [(pool or None, [[names of the convs of one stage], ...])]
        for name, layers in branches.items():
            pool, convs = (layers[0], layers[1:]) if isinstance(layers[0], str) else (None, layers)
            stages, c = [], cin
            for i, conv in enumerate(convs, 1):
                pair = conv if isinstance(conv[0], tuple) else (conv,)
                tag = name if len(convs) == 1 else f'{name}_{i}'
                stages.append([tag + 'a', tag + 'b'] if len(pair) == 2 else [tag])
                for key, spec in zip(stages[-1], pair):   # stride 1 keeps the size (TF's SAME), stride 2 is VALID
                    self.add_module(key, basic_conv2d(c, *spec, padding='same' if len(spec) == 2 else 0))
                c = sum(spec[0] for spec in pair)
            self.branches.append((pool, stages))

    def forward(self, x):
        def branch(pool, stages):
            y = POOLS[pool](x) if pool else x
            for names in stages:   # one conv, or SPLIT's two on the same input
                y = torch.cat([getattr(self, name)(y) for name in names], 1)
            return y
        return torch.cat([branch(pool, stages) for pool, stages in self.branches], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3: no aux head, no dropout, no transform_input; eval mode, gradients off."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = basic_conv2d(3, 32, 3, stride=2), basic_conv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = basic_conv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = basic_conv2d(64, 80, 1), basic_conv2d(80, 192, 3)
        for name, (cin, block, c) in MIXED.items():
            setattr(self, name, Mixed(cin, BLOCKS[block](c)))
        self.fc, self.has_logits = nn.Linear(2048, NUM_LOGITS), True   # False for pytorch-fid's wrapper layout: no fc
        self.eval().requires_grad_(False)

    def forward(self, images):
        """images: uint8 (B, 3, H, W), any H, W -> pool_3 (B, 2048), bias-free logits (B, 1008) or None."""
        expect(images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3,
               f'InceptionV3 expects uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}')
        x = (resize_tf1(images.float(), INPUT_SIZE) - 128) / 128            # (B, 3, 299, 299): (x - 128) * 0.0078125
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                    # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                       # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                    # (B, 192, 35, 35)
        for name in MIXED:
            x = getattr(self, name)(x)                                      # 35 -> 17 (6a) -> 8 (7a): (B, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)                       # (B, 2048): TF's pool_3, the FID feature
        # IS takes TF's softmax/logits/MatMul, the fc *without* its bias (torch-fidelity's 'logits_unbiased'; ADM too)
        return pool, (pool.mm(self.fc.weight.T) if self.has_logits else None)   # (B, 2048), (B, 1008)


# --- Weight loading: one port of the TF graph, two file names (same hash); pytorch-fid's wrapper saves blocks.i.j.* ---
WEIGHT_URLS = [f'https://github.com/{repo}/releases/download/{file}inception-2015-12-05-6726825d.pth' for repo, file in
               [('toshas/torch-fidelity', 'v0.2.0/weights-'), ('mseitzer/pytorch-fid', 'fid_weights/pt_')]]
WRAPPER_NAMES = {f'blocks.{i}.{j}': name for i, names in enumerate([
    'Conv2d_1a_3x3 Conv2d_2a_3x3 Conv2d_2b_3x3', 'Conv2d_3b_1x1 Conv2d_4a_3x3', ' '.join(list(MIXED)[:8]),
    ' '.join(list(MIXED)[8:])]) for j, name in enumerate(names.split())}


def load_inception(path=None, device=None):
    """InceptionV3 from either released weight file or a saved pytorch-fid wrapper (no fc: FID only); without a path,
    from torch hub's checkpoint folder. Missing file, other keys or shapes: a one-line error."""
    hub = os.path.join(torch.hub.get_dir(), 'checkpoints')
    found = list(filter(os.path.isfile, [path] if path else [os.path.join(hub, u.split('/')[-1]) for u in WEIGHT_URLS]))
    expect(found, f'Inception weights not found at {path or hub}; download {" or ".join(WEIGHT_URLS)} and pass its '
           'path (--inception)', FileNotFoundError)
    state = torch.load(found[0], map_location='cpu', weights_only=True)
    expect(isinstance(state, dict), f'{found[0]}: expected a state dict, got {type(state).__name__}')
    state = {re.sub(r'^blocks\.\d\.\d', lambda m: WRAPPER_NAMES.get(m[0], m[0]), k): v for k, v in state.items()}
    model, error = InceptionV3(), f'{found[0]}: not an FID Inception-v3 state dict'
    try:   # not strict: the released files lack num_batches_tracked (BatchNorm fills it in), the wrapper lacks fc
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:   # wrong shapes or types: torch's messages, on one line
        raise ValueError(f'{error}: ' + '; '.join(str(e).split('\n\t')[1:])) from None
    missing = sorted(k for k in missing if not k.endswith('num_batches_tracked'))
    model.has_logits = missing != ['fc.bias', 'fc.weight']
    expect(not unexpected and missing in ([], ['fc.bias', 'fc.weight']),
           f'{error} ({len(missing)} missing keys {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]})')
    return model.to(device or DEVICE)


# --- Images in, features and statistics out -------------------------------------------------------------------------
def check_images(images, channels=(1, 3)):
    """images uint8 (N, H, W) or (N, H, W, C), C in channels -> (N, H, W, C); otherwise a one-line ValueError."""
    expect(not (images.dtype.kind == 'f' and np.isnan(images).any()), 'images contain NaN')
    expect(images.dtype == np.uint8, f'expected uint8 images in 0..255, got {images.dtype}; '
           'convert with np.round(np.clip(x * 255, 0, 255)).astype(np.uint8)')
    images = images[..., None] if images.ndim == 3 else images
    expect(images.ndim == 4 and images.shape[-1] in channels and len(images) > 0, 'expected uint8 NHWC images with '
           f'{" or ".join(map(str, channels))} channel(s), got shape {tuple(images.shape)}')
    return images


def image_batches(source, batch_size):
    """-> (N, iterator of uint8 (b, H, W, 3)) of an NHWC array (grey -> RGB), an .npz (arr_0) or a folder, read as
    torch-fidelity does: its png/jpg/jpeg files, sorted by real path (IS depends on the order), PIL .convert('RGB')."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        from PIL import Image
        files = sorted(os.path.realpath(os.path.join(source, f)) for f in os.listdir(source)
                       if f.endswith(('.png', '.jpg', '.jpeg')))
        expect(files, f'{source}: no .png/.jpg/.jpeg images')
        def load(chunk):
            arrays = [np.asarray(Image.open(f).convert('RGB')) for f in chunk]
            expect(len({a.shape for a in arrays}) == 1, f'{source}: images of different sizes in a batch ({chunk[0]})')
            return np.stack(arrays)
        return len(files), (load(files[i:i + batch_size]) for i in range(0, len(files), batch_size))
    n, batches = read_npz(source, batch_size) if isinstance(source, (str, os.PathLike)) else (None, source)
    if n is None:   # an array, or an arr_0 that cannot be streamed: checked whole, then sliced
        images = check_images(np.asarray(batches))
        n, batches = len(images), (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    return n, (np.repeat(b, 3, axis=-1) if b.shape[-1] == 1 else b for b in batches)


def read_npz(path, batch_size):
    """(N, iterator of uint8 (b, H, W, C)) of the .npz's arr_0, read batch by batch as ADM's evaluator streams it
    (50 000 samples at 512 px are 39 GB); (None, the whole array) if it is not uint8 in C order."""
    expect(not os.path.isfile(path) or zipfile.is_zipfile(path), f'{path}: not an .npz file')
    archive = zipfile.ZipFile(path)
    expect('arr_0.npy' in archive.namelist(), f'{path}: no arr_0 (uint8 NHWC images), only {archive.namelist()}')
    member = archive.open('arr_0.npy')
    version = np.lib.format.read_magic(member)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    shape, fortran, dtype = read_header[version](member) if version in read_header else (None, True, None)
    if fortran or dtype != np.uint8:
        with archive, member, archive.open('arr_0.npy') as whole:
            return None, np.lib.format.read_array(whole)
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
    n, batches = image_batches(images, batch_size)
    pools, logits = [], []
    for batch in tqdm(batches, total=math.ceil(n / batch_size), disable=not progress, desc='inception', unit='batch'):
        pool, logit = model(torch.tensor(batch, device=next(model.parameters()).device).permute(0, 3, 1, 2))
        pools.append(pool.cpu())
        logits.append(logit.cpu() if model.has_logits else None)
    return torch.cat(pools).numpy(), (torch.cat(logits).numpy() if model.has_logits else None)


def feature_statistics(features):
    """{mu, sigma} float64 of features (N, D) float32: mu is the float32 mean as torch-fidelity and ADM take it."""
    expect(len(features) >= 2, f'need at least 2 images for a covariance, got {len(features)}')
    return {'mu': np.mean(features, axis=0).astype(np.float64), 'sigma': np.cov(features, rowvar=False)}


def compute_statistics(images, model=None, batch_size=64, device=None, progress=True):
    """FID statistics {mu (2048,), sigma (2048, 2048)} float64 of uint8 NHWC images, an .npz (arr_0) or a folder."""
    model = model if model is not None else load_inception(device=device)
    return feature_statistics(extract_features(images, model, batch_size, progress)[0])


def load_statistics(path, model=None, batch_size=64, device=None):
    """{mu, sigma} float64 of an .npz with mu/sigma (ours, pytorch-fid's, ADM's VIRTUAL_*.npz, the fork's with float32
    mu), torch-fidelity's cached .pt, or computed from an .npz with only arr_0 (as ADM does) or an image folder."""
    path = os.fspath(path)
    expect(os.path.exists(path), f'statistics file not found: {path}', FileNotFoundError)
    if os.path.isdir(path):
        return compute_statistics(path, model, batch_size, device)
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
    expect(mu.ndim == 1 and sigma.shape == (len(mu),) * 2,
           f'{path}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}')
    return {'mu': mu, 'sigma': sigma}


def save_statistics(stats, path):
    np.savez_compressed(path, mu=np.asarray(stats['mu'], np.float64), sigma=np.asarray(stats['sigma'], np.float64))


# --- The metrics ----------------------------------------------------------------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2, method='eigvals'):
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in float64 (float32: ~3e-4 off).
    'eigvals' (torch-fidelity 0.4 and LTH14's fork: eMIGM's and MAR's numbers): tr sqrt = sum of the real parts of the
    complex square roots of eig(sigma1 sigma2), so the tiny negative eigenvalues of a near-singular product add ~0, not
    NaN; no eps. (With its float32 mu the fork takes |mu1 - mu2|^2 in float32; we do not: ~1e-7 relative there.)
    'sqrtm' (torch-fidelity 0.3, pytorch-fid, ADM): scipy.linalg.sqrtm, retried with 1e-6 added to both diagonals if
    not finite; a diagonal imaginary part above 1e-3 raises, smaller ones are dropped."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, np.float64) for a in (mu1, mu2, sigma1, sigma2))
    d = len(mu1)
    expect(mu1.ndim == 1 and mu2.shape == (d,) and sigma1.shape == (d, d) and sigma2.shape == (d, d),
           f'shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}')
    expect(method in ('eigvals', 'sqrtm'), f"method must be 'eigvals' or 'sqrtm', got {method!r}")
    if method == 'eigvals':
        tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1.dot(sigma2)).astype(np.complex128)).real)
    else:
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            covmean = scipy.linalg.sqrtm((sigma1 + np.eye(d) * 1e-6).dot(sigma2 + np.eye(d) * 1e-6))
        expect(not np.iscomplexobj(covmean) or np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3),
               f'sqrtm: imaginary component {np.max(np.abs(covmean.imag)):.3g}')
        tr_covmean = np.trace(covmean.real)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, splits=10, shuffle=True):
    """torch-fidelity's IS of logits (N, 1008) with its defaults: rows permuted by RandomState(2020), float64 softmax,
    split i = rows [i N // splits, (i + 1) N // splits), each exp(mean KL(p(y|x) || p(y))) -> (mean, population std)."""
    logits = torch.as_tensor(np.asarray(logits))
    n = len(logits)
    expect(logits.ndim == 2 and n >= splits, f'expected logits (N >= {splits}, classes), got {tuple(logits.shape)}')
    logits = (logits[np.random.RandomState(2020).permutation(n)] if shuffle else logits).double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    bounds = [i * n // splits for i in range(splits + 1)]   # split i: rows bounds[i]:bounds[i + 1]; p(y) its mean p
    scores = [(p[a:b] * (log_p[a:b] - torch.log(p[a:b].mean(dim=0, keepdim=True)))).sum(dim=1).mean().exp().item()
              for a, b in zip(bounds, bounds[1:])]
    return float(np.mean(scores)), float(np.std(scores))


def compute_metrics(samples, ref, model=None, batch_size=64, device=None, method='eigvals', progress=True):
    """{'fid', 'inception_score_mean', 'inception_score_std', 'n'} of samples against ref ({mu, sigma} or a path)."""
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
    """Its penultimate layer (128-d) plays Inception's pool_3. Strided convs: ~91% on Fashion-MNIST in 3 epochs."""
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


@contextlib.contextmanager
def num_threads(n):   # small nets gain little from 2 threads; with the other core busy, OpenMP made them 10-25x slower
    previous = torch.get_num_threads()
    torch.set_num_threads(n or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class SmallDataMetric:
    """FD_small: the Frechet distance in a small CNN's 128-d features to its train split, and the CNN's accuracy on
    class-conditional samples (28x28 data). NOT comparable with Inception FID: compare it with itself at the same N
    (its bias ~1/N) and with baselines(). Trained once (seeded; ~1 min of a core), cached under a hash of the data."""
    label = 'FD_small (small-CNN Frechet distance; not comparable with Inception FID)'

    def __init__(self, train_images, train_labels, cache_path, epochs=3, batch_size=128, lr=2e-3, seed=0,
                 threads=1, verbose=True):
        images, labels = check_images(np.asarray(train_images), (1,))[..., 0], np.asarray(train_labels).astype(np.int64)
        expect(labels.shape == (len(images),), f'expected labels of shape ({len(images)},), got {labels.shape}')
        self.threads, recipe = threads, dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        key = hashlib.sha256(repr(('SmallClassifier v1', sorted(recipe.items()), images.shape)).encode()
                             + np.ascontiguousarray(images).tobytes() + labels.tobytes()).hexdigest()
        with torch.random.fork_rng(devices=[]):   # a seeded init that leaves the caller's global RNG alone
            torch.manual_seed(seed)
            self.net = SmallClassifier(int(labels.max()) + 1, images.shape[1])
        cache = torch.load(cache_path, map_location='cpu', weights_only=True) if os.path.isfile(cache_path) else {}
        if cache.get('key') != key:   # train: Adam with a cosine decay to 0, batches in a seeded order
            if verbose:
                print(f'SmallDataMetric: training the classifier on {len(images)} images -> {cache_path}')
            start, x, y = time.time(), torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
            opt, generator = torch.optim.Adam(self.net.parameters(), lr=lr), torch.Generator().manual_seed(seed)
            batches = [i for _ in range(epochs) for i in torch.randperm(len(x), generator=generator).split(batch_size)]
            with num_threads(threads):
                for step, idx in enumerate(batches):
                    opt.param_groups[0]['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / len(batches)))
                    loss = F.cross_entropy(self.net(x[idx])[1], y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            cache = {'key': key, 'model': self.net.eval().state_dict(), 'train_seconds': time.time() - start}
            cache.update({k: torch.from_numpy(v) for k, v in feature_statistics(self.features(images)[0]).items()})
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            torch.save(cache, cache_path)
        self.net.eval().load_state_dict(cache['model'])
        self.train_seconds, self.mu, self.sigma = cache['train_seconds'], cache['mu'].numpy(), cache['sigma'].numpy()

    @torch.no_grad()
    def features(self, images, batch_size=1000):
        """uint8 (N, H, W) -> penultimate features (N, 128) float32, predicted classes (N,) int64."""
        images = torch.from_numpy(np.ascontiguousarray(check_images(np.asarray(images), (1,))[..., 0]))
        with num_threads(self.threads):
            feats, logits = (torch.cat(t) for t in zip(*(self.net(batch) for batch in images.split(batch_size))))
        return feats.numpy(), logits.argmax(1).numpy()

    def evaluate(self, images, labels=None):
        """{'frechet': FD_small of the images against the train statistics, 'accuracy': share classified as labels}."""
        feats, preds = self.features(images)
        stats = feature_statistics(feats)
        out = {'frechet': frechet_distance(stats['mu'], stats['sigma'], self.mu, self.sigma)}
        return out if labels is None else {**out, 'accuracy': float(np.mean(preds == np.asarray(labels)))}

    def baselines(self, test_images, test_labels):
        """On real held-out data: 'floor' = FD_small between the halves of the test images (the noise floor);
        'real_test' / 'blur3x3' = evaluate() of them as they are / through a 3x3 box blur (a visibly degraded set);
        'classifier_accuracy' (a ceiling for samples). Pass as many test images as samples: same N, same bias."""
        test_images = check_images(np.asarray(test_images), (1,))[..., 0]
        half = len(test_images) // 2
        a, b = (feature_statistics(self.features(test_images[i * half:(i + 1) * half])[0]) for i in range(2))
        real = self.evaluate(test_images, test_labels)
        blurred = POOLS['avg'](torch.from_numpy(test_images).float()[:, None])[:, 0].round().byte().numpy()
        return {'floor': frechet_distance(a['mu'], a['sigma'], b['mu'], b['sigma']), 'real_test': real['frechet'],
                'blur3x3': self.evaluate(blurred)['frechet'], 'classifier_accuracy': real['accuracy'],
                'train_seconds': self.train_seconds}


# --- Command line ---------------------------------------------------------------------------------------------------
if __name__ == '__main__':
    stats = sys.argv[1:2] == ['stats']   # `fid.py stats SOURCE --out REF.npz`; otherwise `fid.py SAMPLES --ref REF`
    parser = argparse.ArgumentParser(prog='fid.py' + ' stats' * stats, description=__doc__.strip().splitlines()[0])
    parser.add_argument('images', metavar='SOURCE' if stats else 'SAMPLES',
                        help='.npz with arr_0 (uint8 NHWC, e.g. 50 000 samples) or a folder of png/jpg images')
    if stats:
        parser.add_argument('--out', required=True, help='output .npz with mu, sigma (float64)')
    else:
        parser.add_argument('--ref', required=True, help='stats .npz/.pt (mu, sigma), an ADM batch or a folder')
        parser.add_argument('--method', default='eigvals', choices=['eigvals', 'sqrtm'],
                            help="eigvals: torch-fidelity 0.4, LTH14's fork (eMIGM's numbers); sqrtm: pytorch-fid, ADM")
    parser.add_argument('--inception', help='Inception weights (torch-fidelity or pytorch-fid file)')
    parser.add_argument('--batch-size', type=int, default=64)   # torch-fidelity's default
    parser.add_argument('--device', default=DEVICE)
    args = parser.parse_args(sys.argv[1 + stats:])
    try:   # the usual user errors (expect() and missing files): one line, no traceback
        model = load_inception(args.inception, args.device)
        if stats:
            save_statistics(compute_statistics(args.images, model, args.batch_size), args.out)
            print(f'saved mu, sigma (float64) to {args.out}')
        else:
            metrics = compute_metrics(args.images, args.ref, model, args.batch_size, method=args.method)
            print(f"FID: {metrics['fid']:.4f}  ({metrics['n']} samples)")
            print(f"IS: {metrics['inception_score_mean']:.4f} +- {metrics['inception_score_std']:.4f}"
                  if 'inception_score_mean' in metrics else 'IS: n/a (these weights have no fc layer)')
    except (ValueError, OSError) as error:
        sys.exit(f'fid.py: error: {error}')
