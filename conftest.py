"""pytest's shared fixture: no test leaves its global state to the tests after it (issue 10)."""
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
