"""
The offline small-data metric: a small CNN trained on the user's training split; the Frechet
distance of its features and the conditional accuracy; not comparable with Inception FID.

Why: eMIGM (arXiv 2503.07197, Sec. 5) reports FID-50K with torch-fidelity's Inception-v3
(fid.py). On 28x28 grey data (Fashion-MNIST, the CPU demo) that network, trained on ImageNet
photos at 299 px, tells little, and its weights are a download. Here a 2-conv CNN is trained on
the training split itself (~1 min of one core, ~91% accuracy on Fashion-MNIST); its 128-d
penultimate layer plays the role of pool_3 in the Frechet distance (Heusel et al. 2017,
fid.py), and its argmax on class-conditional samples gives the accuracy for the labels they
were drawn with. Compare numbers only at the same N (the distance has a bias of ~1/N) and
against baselines() of held-out data.

The trained CNN and the statistics of the training split are cached in one file, keyed by a
SHA-256 of the recipe, the image shape and the bytes of the images and labels: other data
or another recipe trains anew (and overwrites the cache file), the same data loads.

Use:
  metric = small_metric.SmallDataMetric(train_images, train_labels, "small_metric.pt")
  metric.evaluate(samples, labels)             # {'frechet': ..., 'accuracy': ...}
  metric.baselines(test_images, test_labels)   # {'floor': ..., 'real_test': ..., 'blur3x3': ...}
(images uint8 (N, H, W), labels int64 (N,)). Tests: python -m pytest -q test_small_metric.py
"""
import contextlib
import hashlib
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fid


# ---- The feature network ----
class SmallClassifier(nn.Module):
    """Its 128-d penultimate layer plays pool_3. ~91% on Fashion-MNIST in 3 epochs."""
    def __init__(self, num_classes, img_size=28, width=32, feature_dim=128):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, width, 5, stride=2, padding=2),  # (B, w, 14, 14)
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # (B, 2w, 7, 7)
            nn.BatchNorm2d(2 * width),
            nn.ReLU())
        self.fc = nn.Linear(2 * width * math.ceil(img_size / 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images):
        x = images.float().unsqueeze(1) / 127.5 - 1  # (B, 1, H, W) in [-1, 1], from uint8
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

    def __init__(self, train_images, train_labels, cache_path, epochs=3, batch_size=128, lr=2e-3,
                 seed=0, threads=1, verbose=True):
        images = fid.check_images(np.asarray(train_images), (1,))[..., 0]
        labels = np.asarray(train_labels).astype(np.int64)
        if labels.shape != (len(images),) or labels.min() < 0:
            raise ValueError(f"expected labels >= 0 ({len(images)},), got {labels.shape}")
        self.threads = threads
        # the cache key: recipe, shape and data (unchanged since fid.py held this class)
        recipe = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        header = repr(("SmallClassifier v1", sorted(recipe.items()), images.shape)).encode()
        key = hashlib.sha256(header + images.tobytes() + labels.tobytes()).hexdigest()
        # a seeded init that leaves the caller's global RNG alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = SmallClassifier(int(labels.max()) + 1, images.shape[1])
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
            stats = fid.feature_statistics(self.features(images)["features"])
            cache = {"key": key, "model": self.net.eval().state_dict(),
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

    @torch.no_grad()
    def features(self, images, batch_size=1000):
        """uint8 (N, H, W) -> {'features': (N, 128), 'classes': predicted (N,)}."""
        images = fid.check_images(np.asarray(images), (1,))[..., 0]
        images = torch.from_numpy(np.ascontiguousarray(images))
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
        """FD_small of test data: 'floor' between its halves, 'real_test' and 'blur3x3' (3x3
        box blur) to train. Pass as many images as samples (the same N, the same bias)."""
        test_images = fid.check_images(np.asarray(test_images), (1,))[..., 0]
        # the floor: two halves of one distribution, N / 2 each
        half = len(test_images) // 2
        first = fid.feature_statistics(self.features(test_images[:half])["features"])
        second = fid.feature_statistics(self.features(test_images[half:2 * half])["features"])
        floor = fid.frechet_distance(first["mu"], first["sigma"], second["mu"], second["sigma"])
        real = self.evaluate(test_images, test_labels)
        # a visibly worse generator: the test images under FID's 3x3 average pool
        blurred = fid.fid_avg_pool(torch.from_numpy(test_images).float()[:, None])  # (N, 1, H, W)
        blurred = blurred[:, 0].round().byte().numpy()
        return {"floor": floor, "real_test": real["frechet"],
                "blur3x3": self.evaluate(blurred)["frechet"],
                "classifier_accuracy": real["accuracy"], "train_seconds": self.train_seconds}
