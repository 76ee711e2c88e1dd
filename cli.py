"""Command-line helpers shared by sample.py, train.py, study.py and inpaint.py: the DDP set-up
(DiT's, made optional), the allocator's and oneDNN's cache's, per-batch seeds, peak memory, and
the argparse value types that check each flag (a bad value exits with status 2 and one line). A
leaf: it imports no project file; tokenizer.py and fid.py, leaves too, keep copies of the two
they need."""
import argparse
import ctypes
import os
import resource
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# ==== Run helpers: processes, seeds, memory (tokenizer.py keeps an identical setup_distributed) ====
@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

def keep_freed_memory():
    """glibc's malloc gives each buffer over 32 MB (a batch's activations) a fresh mmap and
    unmaps it when freed, so each large tensor page-faults anew: 3.5M faults, 10% of an XS
    batch-16 sampling run here (README, Speed). Keep freed memory for reuse, as jemalloc and
    tcmalloc do: mallopt's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD at 1 GiB. -> False off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # macOS, musl, Windows: their own allocator
        return False
    # mallopt's parameters (malloc.h)
    M_TRIM_THRESHOLD = -1
    M_MMAP_THRESHOLD = -3
    mmap_kept = libc.mallopt(M_MMAP_THRESHOLD, 2**30) == 1
    trim_kept = libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1
    return mmap_kept and trim_kept

# oneDNN's default keeps 1024; enough for the reuse within a step (blocks of one shape)
ONEDNN_CACHED_KERNELS = 32

def limit_onednn_cache():
    """oneDNN (emigm.linear) keeps each kernel it built, with a buffer for the reordered
    weight (12 MB for an XS adaLN layer), for each of the last 1024 shapes. Training meets new
    shapes every step (the encoder's length, the head's rows): after 12 XS steps the process
    held 7.2 GB, against 5.9 GB with MKL's kernels or with 32 kept, at the same speed (also
    for sampling). oneDNN reads it at its first kernel: call before any model runs. A user's
    ONEDNN_PRIMITIVE_CACHE_CAPACITY wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHED_KERNELS))

@contextmanager
def packed_weights(model):
    """Inside: each fp32 CPU weight of `model`'s emigm.Linear layers also in oneDNN's blocked
    layout (their `packed`), which calls without autograd take. Otherwise oneDNN reorders a
    weight in every call: thousands per sampling run, 6-9% of an XS run (README, Speed). The
    same values within fp32 rounding (bit-equal XS runs here; 1-row calls take another
    kernel). Costs a second copy of those weights; they must not change inside. Nested: the
    outer one's copies come back at the inner one's end."""
    layers = [m for m in model.modules() if hasattr(m, "packed")]
    outer = [layer.packed for layer in layers]
    onednn = torch.backends.mkldnn.is_available()
    for layer in layers:
        weight = layer.weight.detach()
        if onednn and weight.device.type == "cpu" and weight.dtype == torch.float32:
            layer.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    try:
        yield model
    finally:
        for layer, packed in zip(layers, outer):
            layer.packed = packed

def setup_distributed():
    """DiT's set-up, made optional: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain python is one process.
    Every entry point starts here: the allocator's and oneDNN's memory set-up first."""
    keep_freed_memory()
    limit_onednn_cache()
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

def batch_seed(seed, index):
    """A 32-bit hash of (seed, index): a CPU generator keeps only 32 bits of its seed."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])

def peak_memory_gb(device):
    """Peak memory of this process: allocated on the GPU, or the peak RSS on CPU (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

def compile_model(model, **options):
    """--compile (train.py, sample.py): torch.compile an eMIGM's encoder and decoder stacks and
    its head, each one graph for all shapes (dynamic: the encoder's length and the count read
    change every step); options: inductor's. The data-dependent indexing stays eager."""
    for part in (model.encoder_blocks, model.decoder_blocks, model.diffloss.net):
        part.compile(dynamic=True, options=options)
    return model

# ==== Command-line value types: a bad value exits 2 with one line; None means the default ====
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

def positive_float(text):
    """A learning rate or a temperature."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0: pass a positive number")
    return value

def nonnegative_float(text):
    """A weight decay or a gradient-clipping norm."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: pass a number >= 0")
    return value

def unit_interval(text):
    """A probability, a decay or a time in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1]: pass a number from 0 to 1")
    return value

def guidance_scale(text):
    """A CFG scale: 1 is no guidance."""
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1: pass a scale >= 1 (1 = no guidance)")
    return value
