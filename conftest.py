"""pytest's shared fixtures: no test leaves its global state to the tests after it (issue 10);
a tiny Fashion-MNIST in its IDX format for the tests of train.py and study.py."""
import gzip
import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def restore_global_state():
    """The thread count, the default dtype and the global RNGs (torch, numpy, random) are
    given back after every test as they were before it."""
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    torch_rng = torch.get_rng_state()
    numpy_rng = np.random.get_state()
    python_rng = random.getstate()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_rng_state(torch_rng)
    np.random.set_state(numpy_rng)
    random.setstate(python_rng)


def write_idx(path, array):
    """uint8 `array` as a gzipped IDX file (Fashion-MNIST's format)."""
    sizes = b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    header = bytes([0, 0, 8, array.ndim]) + sizes
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory):
    """40 train and 20 test images of random pixels in Fashion-MNIST's IDX format (labels i % 10)."""
    folder = tmp_path_factory.mktemp("fashion")
    generator = np.random.default_rng(0)
    for split, count in (("train", 40), ("t10k", 20)):
        images = generator.integers(0, 256, (count, 28, 28))
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return folder
