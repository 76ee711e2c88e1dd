"""Training data for train.py: what the flags and the folder say the data is, and its batches.

Kinds of data: random tokens (tests, benchmarks); Fashion-MNIST as pixel tokens (the CPU
demo); latents cached by `tokenizer.py cache` (the paper's runs, Sec. 5: KL-16 at 256 px,
DC-AE at 512 px); an ImageFolder tree through the KL-16 VAE at 256 px; and your own images
at small sizes (<= 64 px) as pixel tokens, decoded once into a uint8 tensor in memory.
A folder is either one subfolder per class (labels: the sorted folder names, torchvision's
order) or a flat folder of images: unconditional data, as --unconditional makes any data.

An unconditional model is an EMIGM with num_classes 1 and label_drop_prob 1.0: every label
drops to the fake class embedding, the one the official sampler uses for labels=None.
Checkpoints of train.py keep what the data was under "data" (checkpoint_entry).

    python data.py --data-path my_images/ --img-size 32 --out my_images_32.npz
(writes the images as the model sees them, ADM's .npz layout: for fid.py and small_metric.py)
"""
import argparse
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import cli
import tokenizer

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")  # labels 0-9
EXTENSIONS = tokenizer.ImageFolder.extensions  # what counts as an image (torchvision's list)
PIXEL_MAX_SIZE = 64  # pixel tokens up to 64 px; larger images go through a VAE
# The default patch: the largest with >= 16 tokens of <= 64 values (the Tiny preset: 16 of 49).
# Measured on 32 px RGB shapes, 300 steps: 16 tokens of 192 values gave saturated noise
# (FD_small 954), 64 tokens of 48 values FD_small 34 (3.2x the time per step).
MIN_TOKENS = 16
MAX_TOKEN_VALUES = 64
# the contract with sample.py: an unconditional model (its labels all drop to the fake class)
UNCONDITIONAL = dict(num_classes=1, label_drop_prob=1.0)
FOLDER_HELP = "pass DIR/<class>/<image> or a flat folder of images"


# ---- What the data is: kind, tokens, classes (checked before any work) ----
@dataclass
class DataSpec:
    kind: str  # "random", "fashion-mnist", "cached", "imagefolder" (KL-16) or "pixels"
    tokenizer: str = None  # "pixel", "kl16" or "dcae"; None: random tokens
    img_size: int = None
    patch: int = None  # pixel tokens: p x p patches
    channels: int = None  # pixel tokens: 1 (all images grey) or 3
    class_names: list = None  # labels 0..K-1 (None: no names)
    num_classes: int = None  # the model's (None: the preset's)
    unconditional: bool = False
    flip: bool = False  # random horizontal flips (official, for images)
    samples: list = field(default_factory=list)  # (path, label) of a folder
    summary: str = ""  # one line for the log

    def checkpoint_entry(self):
        """The checkpoint's "data" (plain data; sample.py builds the tokenizer from it)."""
        class_names = None if self.unconditional else self.class_names
        return dict(tokenizer=self.tokenizer, img_size=self.img_size, patch=self.patch,
                    channels=self.channels, class_names=class_names)

def describe(args):
    """The data the flags name, with its folder listed and checked -> DataSpec."""
    if args.dataset != "imagefolder" and args.img_size not in (256, 512):
        raise ValueError(f"--img-size {args.img_size}: 256 or 512 (own images up to "
                         f"{PIXEL_MAX_SIZE} px: --data-path DIR)")
    if args.dataset == "random":  # shapes of the model; labels of its classes
        spec = DataSpec("random", img_size=args.img_size, num_classes=args.num_classes)
        spec.summary = "random tokens"
    elif args.dataset == "fashion-mnist":
        if args.data_path is not None:
            check_folder("--data-path", args.data_path)
        if 28 % args.patch:
            raise ValueError(f"--patch {args.patch} does not divide 28: pass 2, 4, 7 or 14")
        spec = DataSpec("fashion-mnist", "pixel", 28, args.patch, 1,
                        list(FASHION_MNIST_CLASSES), num_classes=10)
        spec.summary = f"Fashion-MNIST, 28x28 grey, {patch_words(28, args.patch, 1)}"
        if not args.unconditional:
            check_num_classes(args.num_classes, 10, "Fashion-MNIST has 10 classes")
    elif args.dataset == "cached":
        check_folder("--cached-path", args.cached_path)
        kind = "dcae" if args.img_size == 512 else "kl16"
        spec = DataSpec("cached", kind, args.img_size, num_classes=args.num_classes)
        spec.summary = f"{kind} latents cached in {args.cached_path}"
    else:
        spec = describe_folder(args)
    if args.unconditional:
        check_num_classes(args.num_classes, 1, "an unconditional model has 1 class")
        if not spec.unconditional:  # labelled data
            spec.summary += "; --unconditional: its labels are ignored"
        spec.unconditional = True
    if spec.unconditional and args.label_drop_prob not in (None, 1.0):
        raise ValueError(f"--label-drop-prob {args.label_drop_prob}: an unconditional model "
                         f"drops every label (1.0): drop --label-drop-prob")
    return spec

def describe_folder(args):
    """An image folder: the KL-16 VAE at 256 px (--vae), else pixel tokens (<= 64 px)."""
    if args.data_path is None:
        raise FileNotFoundError(f"--data-path: {FOLDER_HELP} (with --vae kl16.ckpt for 256 px)")
    found = find_images(args.data_path)
    classes = found["classes"]
    count = f"{len(found['samples'])} images"
    if classes is None:  # a flat folder: unconditional data
        count += f" in {args.data_path} (a flat folder: unconditional)"
        check_num_classes(args.num_classes, 1, f"{args.data_path} is a flat folder (1 class)")
    else:
        count += f" of {len(classes)} classes in {args.data_path}"
    if classes is not None and not args.unconditional:
        check_num_classes(args.num_classes, len(classes),
                          f"{args.data_path} has {len(classes)} class folders")
    flip = args.flip is not False  # on unless --no-flip (the official flips)
    if args.vae is not None:  # the paper's path: 256 px through the KL-16 VAE
        if args.img_size != 256:
            raise ValueError(f"--img-size {args.img_size} with --vae: KL-16 takes 256 px "
                             f"(512 px: DC-AE latents via --cached-path)")
        spec = DataSpec("imagefolder", "kl16", 256, class_names=classes, flip=flip)
    else:
        spec = describe_pixels(args, found["samples"], classes)
        spec.flip = flip
    spec.num_classes = 1 if classes is None else len(classes)
    spec.unconditional = classes is None
    spec.samples = found["samples"]
    spec.summary = f"{count}, {spec.summary or 'KL-16 latents of 256 px crops'}"
    if not flip:
        spec.summary += ", no flips"
    return spec

def describe_pixels(args, samples, classes):
    """Small images as p x p pixel patches: size, grey or RGB, patch, from the files."""
    headers = [read_header(path) for path, _ in samples]
    sizes = sorted({header["size"] for header in headers})
    channels = 1 if all(header["mode"] == "L" for header in headers) else 3
    img_size = args.img_size
    if img_size is None:  # the images' own size, when they share one square size
        if len(sizes) > 1 or sizes[0][0] != sizes[0][1]:
            shown = ", ".join(f"{w}x{h}" for w, h in sizes[:6]) + ", ..." * (len(sizes) > 6)
            kind = "mixed sizes" if len(sizes) > 1 else "a size that is not square"
            raise ValueError(f"--data-path {args.data_path}: images have {kind} ({shown}): "
                             f"pass --img-size N to resize and center-crop them")
        img_size = sizes[0][0]
    if img_size > PIXEL_MAX_SIZE:
        raise ValueError(f"--img-size {img_size}: pixel tokens go up to {PIXEL_MAX_SIZE} px: "
                         f"pass --img-size {PIXEL_MAX_SIZE} or less, or --vae kl16.ckpt (256 px)")
    patch = args.patch
    if patch is None:  # >= 16 tokens of <= 64 values (MIN_TOKENS, MAX_TOKEN_VALUES)
        largest = max(math.isqrt(img_size * img_size // MIN_TOKENS), 1)
        fits = [p for p in range(1, largest + 1)
                if img_size % p == 0 and channels * p * p <= MAX_TOKEN_VALUES]
        patch = max(fits)  # 1 always fits
    if img_size % patch:
        divisors = [p for p in range(2, img_size) if img_size % p == 0]
        raise ValueError(f"--patch {patch} does not divide --img-size {img_size}: pass one of "
                         f"{divisors or [1]}")
    colour = "grey" if channels == 1 else "RGB"
    spec = DataSpec("pixels", "pixel", img_size, patch, channels, classes)
    spec.summary = f"{img_size}x{img_size} {colour}, {patch_words(img_size, patch, channels)}"
    return spec

def patch_words(img_size, patch, channels):  # "7x7 pixel patches (16 tokens of 49)"
    tokens = (img_size // patch) ** 2
    return f"{patch}x{patch} pixel patches ({tokens} tokens of {channels * patch * patch})"

def check_num_classes(given, found, why):
    if given is not None and given != found:
        raise ValueError(f"--num-classes {given}: {why}: drop --num-classes")

def check_folder(flag, folder):
    if folder is None or not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {folder} is not a folder")

def check_resume(saved, spec, path):
    """The data of the run resumed (its checkpoint's "data") against this data."""
    if saved is None:  # written before checkpoints kept their data
        return
    entry = spec.checkpoint_entry()
    if saved["class_names"] != entry["class_names"]:
        raise ValueError(f"--resume {path} was trained on the classes {saved['class_names']}, "
                         f"this data has {entry['class_names']}: pass the data of its run")
    diff = [f"{key}={saved[key]} (this data {value})" for key, value in entry.items()
            if saved.get(key) != value]
    if diff:
        raise ValueError(f"--resume {path} was trained on other data: {', '.join(diff)}. "
                         f"Pass the data of its run")

def model_fields(spec):
    """The EMIGM arguments that the data sets: tokens, classes, the unconditional contract."""
    fields = {}
    if spec.kind == "pixels":
        fields.update(seq_len=(spec.img_size // spec.patch) ** 2,
                      token_channels=spec.channels * spec.patch ** 2)
    if spec.num_classes is not None:
        fields.update(num_classes=spec.num_classes)
    if spec.unconditional:
        fields.update(UNCONDITIONAL)
    return fields

def is_unconditional(config):
    """Is this an unconditional model (UNCONDITIONAL: its labels all drop to the fake class)?"""
    return all(config[name] == value for name, value in UNCONDITIONAL.items())


# ---- Image folders: listing, headers, decoding ----
def find_images(root):
    """{'classes': sorted folder names or None (flat), 'samples': [(path, label)]}, in
    torchvision's order (tokenizer.ImageFolder's); one-line errors for odd layouts."""
    root = Path(root)
    check_folder("--data-path", root)
    entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    folders = [entry.name for entry in entries if entry.is_dir()]
    files = [entry.name for entry in entries if entry.is_file() and is_image(entry.name)]
    samples = []
    for label, name in enumerate(folders):
        found = []
        for folder, _, names in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(names):
                if is_image(file):
                    found.append((os.path.join(folder, file), label))
        if not found and not files:
            raise ValueError(f"--data-path {root}: the class folder {name!r} holds no images: "
                             f"add images to it or remove it")
        samples.extend(found)
    if files and samples:
        raise ValueError(f"--data-path {root} has images both in it ({files[0]}, ...) and in "
                         f"subfolders: move them into class folders, or the subfolders out")
    if files:  # a flat folder (subfolders without images are not classes then)
        return {"classes": None, "samples": [(str(root / name), 0) for name in files]}
    if not samples:
        raise FileNotFoundError(f"--data-path {root} holds no images ({', '.join(EXTENSIONS)}): "
                                f"{FOLDER_HELP}")
    return {"classes": folders, "samples": samples}

def is_image(name):
    return name.lower().endswith(EXTENSIONS)

def read_header(path):
    """{'size': (W, H), 'mode': PIL's mode} from the file's header (no decoding)."""
    try:
        with Image.open(path) as image:
            return {"size": image.size, "mode": image.mode}
    except (OSError, ValueError) as error:
        raise ValueError(f"--data-path: {path} is not a readable image "
                         f"({type(error).__name__}): remove or replace it") from None

def load_pixels(spec):
    """All images, resized and center-cropped (ADM's crop) -> dict(images=uint8 (N, S, S) or
    (N, S, S, 3), labels=int64 (N,))."""
    mode = "L" if spec.channels == 1 else "RGB"
    images = []
    for path, _ in spec.samples:
        with Image.open(path) as image:
            images.append(tokenizer.center_crop_arr(image.convert(mode), spec.img_size))
    labels = torch.tensor([label for _, label in spec.samples], dtype=torch.int64)
    return dict(images=torch.from_numpy(np.stack(images)), labels=labels)

def load_folder(path, img_size=None):
    """A folder of small images as the model sees them -> dict(images=uint8 (N, S, S) or
    (N, S, S, 3), labels=int64 (N,), class_names=list or None), numpy."""
    flags = argparse.Namespace(data_path=str(path), img_size=img_size, patch=1, vae=None,
                               num_classes=None, flip=None, unconditional=False)
    spec = describe_folder(flags)
    pixels = load_pixels(spec)
    return dict(images=pixels["images"].numpy(), labels=pixels["labels"].numpy(),
                class_names=spec.class_names)

class ImageFiles(tokenizer.ImageFolder):
    """tokenizer.ImageFolder's crop and [-1, 1] images, on a listed (path, label) set."""

    def __init__(self, samples, img_size):
        self.samples = samples
        self.img_size = img_size


# ---- Batches: (x, label), and to_tokens(x) ----
@dataclass
class TrainData:
    kind: str  # DataSpec.kind
    dataset: torch.utils.data.Dataset
    tokenizer: torch.nn.Module = None  # decodes grids (None: no grids)
    spec: DataSpec = None
    labelled: dict = None  # images (N, S, S[, 3]) and labels (N,), numpy: the small metric's

    @property
    def entry(self):  # the checkpoint's "data"
        return self.spec.checkpoint_entry()

    @torch.no_grad()
    def to_tokens(self, x, device):  # a batch -> tokens (B, L, C)
        if self.kind == "fashion-mnist":  # uint8 (B, 28, 28) -> [-1, 1] -> patches
            return self.tokenizer.encode(x.to(device)[:, None].float() / 127.5 - 1)
        if self.kind == "random" or self.kind == "cached":
            return x.to(device)
        if self.kind == "pixels":  # uint8 (B, S, S) or (B, S, S, 3) -> (B, C, S, S) in [-1, 1]
            x = x.to(device).float() / 127.5 - 1
            x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if self.spec.flip:  # images (B, C, H, W): a random flip (official)
            flip = torch.rand(len(x)) < 0.5  # (B,)
            x = torch.where(flip[:, None, None, None].to(x.device), x.flip(-1), x)
        return self.tokenizer.encode(x.to(device))  # a VAE sample, or the patches

def build_data(args, spec, model, device):
    """The dataset of `spec` (from describe), labels 0 when unconditional -> TrainData."""
    if spec.kind == "random":  # for tests and benchmarks
        count = max(4 * args.global_batch_size, 256)
        generator = torch.Generator().manual_seed(args.seed)
        shape = (count, model.seq_len, model.token_channels)
        tokens = torch.randn(shape, generator=generator)
        labels = torch.randint(model.num_classes, (count,), generator=generator)
        return TrainData("random", TensorDataset(tokens, labels), spec=spec)
    if spec.kind == "fashion-mnist":  # pixel tokens: no VAE
        images, labels = tokenizer.load_fashion_mnist("train", args.data_path)  # (N, 28, 28)
        pixels = tokenizer.PixelTokenizer(patch=spec.patch, img_size=28, in_channels=1)
        labelled = dict(images=images.numpy(), labels=labels.numpy())
        dataset = TensorDataset(images, unlabelled(labels, spec))
        return TrainData("fashion-mnist", dataset, pixels.to(device), spec, labelled)
    if spec.kind == "cached":  # flips, posterior samples: the global RNG
        dataset = tokenizer.CachedLatents(args.cached_path)
        if dataset.kind != spec.tokenizer:
            raise ValueError(f"--cached-path {args.cached_path} holds {dataset.kind} "
                             f"latents: pass the other --img-size")
        check_cached_labels(dataset, model.num_classes, spec, args.cached_path)
        if spec.unconditional:
            dataset = Unlabelled(dataset)
        if args.vae is None:
            return TrainData("cached", dataset, spec=spec)
        decoder = tokenizer.load_tokenizer(dataset.kind, args.vae)  # for grids only
        return TrainData("cached", dataset, decoder.to(device).eval(), spec)
    samples = spec.samples
    if spec.unconditional:
        samples = [(path, 0) for path, _ in samples]
    if spec.kind == "imagefolder":
        kl16 = tokenizer.load_tokenizer("kl16", args.vae).to(device).eval()
        return TrainData("imagefolder", ImageFiles(samples, spec.img_size), kl16, spec)
    # own small images: decoded once, in memory, as Fashion-MNIST
    pixels = load_pixels(spec)
    tok = tokenizer.PixelTokenizer(spec.patch, spec.img_size, spec.channels)
    labelled = None
    if spec.class_names is not None and len(spec.class_names) >= 2:
        labelled = dict(images=pixels["images"].numpy(), labels=pixels["labels"].numpy())
    dataset = TensorDataset(pixels["images"], unlabelled(pixels["labels"], spec))
    return TrainData("pixels", dataset, tok.to(device), spec, labelled)

def unlabelled(labels, spec):  # an unconditional model sees label 0 only (then dropped)
    return torch.zeros_like(labels) if spec.unconditional else labels

class Unlabelled(torch.utils.data.Dataset):
    """A dataset's examples with label 0 (an unconditional model's only class)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], torch.tensor(0)

def check_cached_labels(dataset, num_classes, spec, path):
    """Labels beyond the model's classes fail in the embedding: say so before training."""
    if spec.unconditional:
        return
    top = max(int(shard["labels"].max()) for shard in dataset.shards)
    if top >= num_classes:
        raise ValueError(f"--cached-path {path} has labels up to {top}, the model "
                         f"{num_classes} classes: pass --num-classes {top + 1}")

class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch."""
    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

def make_loader(dataset, batch_size, ddp, seed, num_workers):
    sampler = ResumableSampler(dataset, ddp.world_size, ddp.rank, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size, sampler=sampler, drop_last=True,
                        num_workers=num_workers, pin_memory=ddp.device.type == "cuda",
                        generator=torch.Generator())  # its own: not the global RNG
    if len(loader) == 0:
        raise ValueError(f"--global-batch-size {batch_size * ddp.world_size} is more than "
                         f"the {len(dataset)} examples: pass a smaller one")
    return loader


# ---- Command line: a folder as the model sees it, in ADM's .npz layout ----
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True, help="class folders, or a flat folder")
    p.add_argument("--img-size", type=cli.positive_int, help="default: the images' own size")
    p.add_argument("--out", required=True, help="an .npz: arr_0 uint8 NHWC, arr_1 labels")
    return p

def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"  # as numpy does
    try:
        if os.path.exists(out):
            raise ValueError(f"--out {out} exists: pass a new file")
        found = load_folder(args.data_path, args.img_size)
        images = found["images"]
        if images.ndim == 3:  # grey: one channel
            images = images[..., None]
        np.savez(out, arr_0=images, arr_1=found["labels"])
    except (ValueError, FileNotFoundError, OSError) as error:
        message = " ".join(str(error).split())  # one line
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    names = found["class_names"] or ["(a flat folder: no classes)"]
    print(f"wrote {out}: {images.shape} uint8; labels 0-{len(names) - 1}: {', '.join(names)}")


if __name__ == "__main__":
    main()
