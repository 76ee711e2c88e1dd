"""
The offline small-data metric: a small CNN trained on the user's training split; the Frechet
distance of its features and the conditional accuracy; not comparable with Inception FID.

Why: eMIGM (arXiv 2503.07197, Sec. 5) reports FID-50K with torch-fidelity's Inception-v3
(fid.py). On small images (28x28 grey Fashion-MNIST, the CPU demo; your own 32 or 64 px
sets) that network, trained on ImageNet photos at 299 px, tells little, and its weights are a
download. Here a 2-conv CNN is trained on the training split itself (~1 min of one core, ~91%
accuracy on Fashion-MNIST); its 128-d penultimate layer plays the role of pool_3 in the Frechet
distance (Heusel et al. 2017, fid.py), and its argmax on class-conditional samples gives the
accuracy for the labels they were drawn with. Compare numbers only at the same N (the distance
has a bias of ~1/N) and against baselines() of held-out data.

Any labelled set of square uint8 images of 8-64 px, grey (N, H, W) or RGB (N, H, W, 3), with 2
classes or more. The trained CNN and the statistics of the training split are cached in one
file, keyed by a SHA-256 of the recipe, the image shape and the bytes of the images and labels:
other data never reuses it (a file given is overwritten; by default each data set has its own
file, CACHE_DIR/small_metric_<key>.pt).

Use:
  metric = small_metric.SmallDataMetric(train_images, train_labels, "small_metric.pt")
  metric.evaluate(samples, labels)             # {'frechet': ..., 'accuracy': ...}
  metric.baselines(test_images, test_labels)   # {'floor': ..., 'real_test': ..., 'blur3x3': ...}
  python small_metric.py --data-path my_images/ --samples out/samples.npz
(the folder: class folders, as train.py reads them, or data.py's .npz). Tests: test_small_metric.py
"""
import argparse
import contextlib
import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import fid

CACHE_DIR = Path.home() / ".cache" / "emigm-mini"  # sample.METRIC_CACHE (Fashion-MNIST's) too
CACHE_VERSION = "SmallClassifier v2"  # in the cache key: a new version retrains
MIN_SIZE = 8  # image sides, in pixels: two stride-2 convolutions
MAX_SIZE = 64

# ---- The feature network ----
class SmallClassifier(nn.Module):
    """Its 128-d penultimate layer plays pool_3. ~91% on Fashion-MNIST in 3 epochs."""
    def __init__(self, num_classes, img_size=28, width=32, feature_dim=128, in_channels=1):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, stride=2, padding=2),  # (B, w, 14, 14)
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # (B, 2w, 7, 7)
            nn.BatchNorm2d(2 * width),
            nn.ReLU())
        self.fc = nn.Linear(2 * width * math.ceil(img_size / 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images):
        x = images.float() / 127.5 - 1  # [-1, 1], from uint8 (B, H, W) or (B, H, W, 3)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (B, C, H, W)
        features = F.relu(self.fc(self.convs(x).flatten(1)))  # (B, 128)
        return features, self.head(features)  # (B, 128), (B, num_classes)


@contextlib.contextmanager
def num_threads(n):
    """n threads inside (None: as is): 2 on a busy machine made these nets 10-25x slower."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---- The metric: FD_small and the conditional accuracy ----
class SmallDataMetric:
    """FD_small: the Frechet distance in a small CNN's features to its train split, and the CNN's
    accuracy on class-conditional samples. Compare it at the same N (bias ~1/N) and with
    baselines(). Trained once (~1 min of a core), cached under a hash of the data."""
    label = "FD_small (small-CNN Frechet distance; not comparable with Inception FID)"

    def __init__(self, train_images, train_labels, cache_path=None, epochs=3, batch_size=128,
                 lr=2e-3, seed=0, threads=1, verbose=True):
        images = check_small_images(train_images)  # (N, H, W) grey or (N, H, W, 3)
        labels = np.asarray(train_labels).astype(np.int64)
        if labels.shape != (len(images),) or labels.min() < 0:
            raise ValueError(f"expected labels >= 0 ({len(images)},), got {labels.shape}")
        if len(np.unique(labels)) < 2:
            raise ValueError("labels: the small metric's classifier needs 2 classes or more")
        self.threads = threads
        self.image_shape = images.shape[1:]
        # the cache key: recipe, shape and data (v2: statistics with BatchNorm in eval mode; v1
        # took them in train mode: batch statistics, wrong for data sorted by class)
        recipe = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        header = repr((CACHE_VERSION, sorted(recipe.items()), images.shape)).encode()
        key = hashlib.sha256(header + images.tobytes() + labels.tobytes()).hexdigest()
        if cache_path is None:  # one file per data set
            cache_path = CACHE_DIR / f"small_metric_{key[:16]}.pt"
        self.cache_path = str(cache_path)
        # a seeded init that leaves the caller's global RNG alone
        channels = 1 if images.ndim == 3 else 3
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = SmallClassifier(int(labels.max()) + 1, images.shape[1], in_channels=channels)
        cache = {"key": None}
        if os.path.isfile(cache_path):
            cache = fid.read_torch(cache_path, "SmallDataMetric cache")
            if not isinstance(cache, dict) or "key" not in cache:
                raise ValueError(f"{cache_path} is no SmallDataMetric cache: pass another path")
        # another key: train, then cache the weights and the train split's {mu, sigma}
        if cache["key"] != key:
            fid.check_writable(cache_path)
            if verbose:
                print(f"SmallDataMetric: training ({len(images)} images)")
            start = time.time()
            self.train(images, labels, **recipe)
            self.net.eval()  # the features as evaluate() sees them
            stats = fid.feature_statistics(self.features(images)["features"])
            cache = {"key": key, "model": self.net.state_dict(),
                     "train_seconds": time.time() - start,
                     "mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(stats["sigma"])}
            torch.save(cache, cache_path)
        self.net.eval().load_state_dict(cache["model"])
        self.train_seconds = cache["train_seconds"]
        self.mu = cache["mu"].numpy()
        self.sigma = cache["sigma"].numpy()

    def train(self, images, labels, epochs, batch_size, lr, seed):
        """Adam with a cosine decay to 0, batches in a seeded order."""
        x = torch.from_numpy(np.ascontiguousarray(images))
        y = torch.from_numpy(labels)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(epochs):
            batches.extend(torch.randperm(len(x), generator=generator).split(batch_size))
        with num_threads(self.threads):
            for step, index in enumerate(batches):
                decay = 0.5 * (1 + math.cos(math.pi * step / len(batches)))
                optimizer.param_groups[0]["lr"] = lr * decay
                loss = F.cross_entropy(self.net(x[index])[1], y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    def as_trained(self, images):
        """Images in the layout of the train split: grey (N, H, W) or RGB (N, H, W, 3)."""
        images = check_small_images(images)
        if images.ndim == 4 and len(self.image_shape) == 2:  # RGB in, grey data
            if not (np.array_equal(images[..., 0], images[..., 1])
                    and np.array_equal(images[..., 0], images[..., 2])):
                raise ValueError(f"images {images.shape[1:]} are in colour, the metric's data "
                                 f"grey {self.image_shape}: pass grey images")
            images = images[..., 0]  # sample.py repeats grey into 3 channels
        if images.ndim == 3 and len(self.image_shape) == 3:  # grey in, RGB data
            images = np.repeat(images[..., None], 3, axis=-1)
        if images.shape[1:] != self.image_shape:
            raise ValueError(f"images {images.shape[1:]}, the metric's data {self.image_shape}: "
                             f"pass images of the size it was trained on")
        return images

    @torch.no_grad()
    def features(self, images, batch_size=1000):
        """uint8 (N, H, W[, 3]) -> {'features': (N, 128), 'classes': predicted (N,)}."""
        images = torch.from_numpy(np.ascontiguousarray(self.as_trained(images)))
        features = []
        classes = []
        with num_threads(self.threads):
            for batch in images.split(batch_size):
                feature, logits = self.net(batch)
                features.append(feature)
                classes.append(logits.argmax(1))
        return {"features": torch.cat(features).numpy(), "classes": torch.cat(classes).numpy()}

    def evaluate(self, images, labels=None):
        """{'frechet': FD_small to the train split, 'accuracy': as labels}."""
        features = self.features(images)
        stats = fid.feature_statistics(features["features"])
        result = {"frechet": fid.frechet_distance(stats["mu"], stats["sigma"], self.mu, self.sigma)}
        if labels is not None:
            result["accuracy"] = float(np.mean(features["classes"] == np.asarray(labels)))
        return result

    def baselines(self, test_images, test_labels):
        """FD_small of test data: 'floor' between its halves, 'real_test', 'blur3x3' and
        'blur2x2' (box blurs) to train. Pass as many images as samples (the same N, the same bias)."""
        test_images = self.as_trained(test_images)
        # the floor: two halves of one distribution, N / 2 each
        half = len(test_images) // 2
        first = fid.feature_statistics(self.features(test_images[:half])["features"])
        second = fid.feature_statistics(self.features(test_images[half:2 * half])["features"])
        floor = fid.frechet_distance(first["mu"], first["sigma"], second["mu"], second["sigma"])
        real = self.evaluate(test_images, test_labels)
        # a visibly worse generator: the test images under FID's 3x3 average pool
        x = torch.from_numpy(test_images).float()
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
        blurred = fid.fid_avg_pool(x).round().byte().permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        # a milder one (issue 14's demo target): a 2x2 box blur, the edge row repeated
        padded = F.pad(x, (0, 1, 0, 1), mode="replicate")  # (N, C, H + 1, W + 1)
        mild = F.avg_pool2d(padded, 2, stride=1).round().byte().permute(0, 2, 3, 1).numpy()
        if test_images.ndim == 3:
            blurred = blurred[..., 0]
            mild = mild[..., 0]
        return {"floor": floor, "real_test": real["frechet"],
                "blur3x3": self.evaluate(blurred)["frechet"],
                "blur2x2": self.evaluate(mild)["frechet"],
                "classifier_accuracy": real["accuracy"], "train_seconds": self.train_seconds}

def check_small_images(images):
    """uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3), square, 8-64 px -> (N, H, W) or (N, H, W, 3)."""
    images = fid.check_images(np.asarray(images), (1, 3))
    if images.shape[-1] == 1:
        images = images[..., 0]
    H, W = images.shape[1:3]
    if H != W or not MIN_SIZE <= H <= MAX_SIZE:
        raise ValueError(f"images {H}x{W}: the small metric takes square images of {MIN_SIZE} "
                         f"to {MAX_SIZE} px (data.py --img-size N resizes a folder)")
    return images


# ---- Command line: samples against your labelled images ----
def load_labelled(path, img_size=None):
    """Class folders (as train.py reads them) or an .npz (arr_0 images, arr_1 labels) ->
    dict(images=, labels=, class_names= list or None)."""
    if os.path.isdir(path):
        import data  # folders: its listing, crop and checks (it imports tokenizer)
        found = data.load_folder(path, img_size)
        if found["class_names"] is None:
            raise ValueError(f"{path} is a flat folder: the classifier needs class folders")
        return found
    if img_size is not None:
        raise ValueError(f"{path} is no folder: --img-size resizes folders only")
    found = read_npz(path)
    if found["labels"] is None:
        raise ValueError(f"{path} has no labels (arr_1): pass class folders or data.py's .npz")
    return dict(found, class_names=None)

def read_npz(path):
    """-> dict(images=arr_0, labels=arr_1 or None) of an .npz (sample.py's, data.py's)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with np.load(path) as npz:
            labels = npz["arr_1"].astype(np.int64) if "arr_1" in npz.files else None
            return dict(images=npz["arr_0"], labels=labels)
    except Exception as error:
        raise ValueError(f"{path}: not an .npz with arr_0 ({type(error).__name__})") from None

def run(args):
    """Read both sets and check them, train (or load) the classifier, print the metric."""
    with fid.flag("--data-path"):
        train = load_labelled(args.data_path, args.img_size)
        train["images"] = check_small_images(train["images"])
    names = train["class_names"]
    if names is None:
        names = [f"class {c}" for c in range(int(train["labels"].max()) + 1)]
    with fid.flag("--samples"):
        samples = read_npz(args.samples)
        labels = None if args.unconditional else samples["labels"]
        if labels is not None and not 0 <= labels.min() <= labels.max() < len(names):
            raise ValueError(f"{args.samples}: labels {labels.min()}-{labels.max()}, the data "
                             f"{len(names)} classes: pass --unconditional or its own samples")
    with fid.flag("--data-path"):
        metric = SmallDataMetric(train["images"], train["labels"], args.cache)
    with fid.flag("--samples"):
        result = metric.evaluate(samples["images"], labels)
        predicted = metric.features(samples["images"])["classes"]
    # the same number of training images: as they are, and blurred (the scale of FD)
    count = min(len(samples["images"]), len(train["images"]))
    index = np.random.default_rng(0).permutation(len(train["images"]))[:count]
    base = metric.baselines(train["images"][index], train["labels"][index])
    accuracy = ""
    if "accuracy" in result:
        accuracy = f"  accuracy {result['accuracy']:.3f}"
    shares = np.bincount(predicted, minlength=len(names)) / len(predicted)
    data_shares = np.bincount(train["labels"], minlength=len(names)) / len(train["labels"])
    classes = ", ".join(f"{name} {a:.2f} ({b:.2f})" for name, a, b in zip(names, shares, data_shares))
    print(f"{metric.label}; {len(samples['images'])} samples against {len(train['images'])} "
          f"training images of {len(names)} classes (classifier in {metric.cache_path}):\n"
          f"  samples          FD {result['frechet']:9.3f}{accuracy}\n"
          f"  training images  FD {base['real_test']:9.3f}  accuracy "
          f"{base['classifier_accuracy']:.3f} ({count} of them; seen in training: a floor)\n"
          f"  3x3 blur         FD {base['blur3x3']:9.3f}  (the same, blurred: a worse generator)\n"
          f"  classes of the samples as the classifier sees them (of the data): {classes}")
    return dict(result, **base)

def build_parser():
    p = argparse.ArgumentParser(prog="small_metric.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("--data-path", required=True,
                   help="your training images: class folders, or data.py's .npz")
    p.add_argument("--samples", required=True, help="an .npz: arr_0 uint8 images, arr_1 labels")
    p.add_argument("--img-size", type=cli.positive_int, help="a folder's (as train.py's)")
    p.add_argument("--unconditional", action="store_true", help="no accuracy: unlabelled samples")
    p.add_argument("--cache", help="the classifier's file (default: one per data set)")
    return p

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as error:
        message = " ".join(str(error).split())  # one line
        parser.exit(2, f"{parser.prog}: error: {message}\n")


if __name__ == "__main__":
    main()
