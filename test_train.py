"""Tests of train.py: DDP on 2 gloo processes, exact resume, plain-data checkpoints, one-line errors, the demo path.
Tiny configs on random tokens (and a few synthetic Fashion-MNIST-format images), fp32 on CPU, one thread each."""
import gzip
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import train

HERE = Path(__file__).parent
# A few-thousand-parameter eMIGM: 49 tokens of 16 channels (the Tiny preset's shape), width 32, 1+1 blocks.
TINY = ["--size", "Tiny", "--dataset", "random", "--width", "32", "--depth", "1", "--num-heads", "2", "--head-depth",
        "1", "--head-width", "32", "--buffer-size", "2", "--blr", "1e-2", "--warmup-epochs", "0.5",
        "--log-every", "1"]


def run(tmp, *flags):
    return train.main(train.parse_args([*TINY, "--results-dir", str(tmp), *flags]))


def one_line_error(excinfo):
    msg = str(excinfo.value.code)
    assert msg.startswith("train.py: error:") and "\n" not in msg, msg
    return msg


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    model, ema = run(out, "--global-batch-size", "8", "--max-steps", "3")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_stay_in_sync(tmp_path):
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs between ranks"
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss,lr,grad_norm,images_per_s,peak_mem_gb") and len(rows) == 4
    assert all(np.isfinite(float(r.split(",")[2])) for r in rows[1:])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2  # both ranks' RNG states, for an exact resume


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps at 4 steps per epoch (256 random examples, batch 64): a numbered checkpoint at step 3, mid-epoch."""
    out = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    model, ema = run(out, "--global-batch-size", "64", "--max-steps", "6", "--ckpt-every", "3",
                     "--lr-schedule", "cosine")
    return out, model, ema


def test_resume_is_exact(straight, tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more: weights, EMA and optimizer state bitwise equal."""
    out, model, ema = straight
    model2, ema2 = run(tmp_path, "--global-batch-size", "64", "--max-steps", "6", "--lr-schedule", "cosine",
                       "--resume", str(out / "ckpt_0000003.pt"))
    rows = (tmp_path / "log.csv").read_text().splitlines()[1:]  # a resume that restarted at 0 would also match
    assert [int(r.split(",")[0]) for r in rows] == [4, 5, 6]
    for a, b in ((model, model2), (ema, ema2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    opt_a = torch.load(out / "last.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def test_checkpoint_is_plain_data(straight):
    out, model, _ = straight
    ckpt = torch.load(out / "last.pt", weights_only=True)  # no pickled classes: loads under weights_only
    assert {"model", "ema", "optimizer", "step", "epoch", "args", "config", "rng"} <= set(ckpt)
    assert ckpt["step"] == 6 and ckpt["epoch"] == 1.5 and isinstance(ckpt["args"], dict)
    assert ckpt["args"]["global_batch_size"] == 64 and ckpt["config"] == model.config
    rebuilt = train.emigm.EMIGM(**ckpt["config"])
    train.emigm.load_weights(rebuilt, ckpt)  # what sample.py does: the EMA weights into a model from the config
    assert not (out / "last.pt.tmp").exists()  # written to a temp file, then renamed


def test_resume_from_another_size_is_one_line(straight, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--width", "48", "--resume", str(straight[0] / "last.pt"))
    assert "width=32 (this run 48)" in one_line_error(e)


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--lr", "1e30", "--warmup-epochs", "0", "--max-steps", "5")  # step 1 sends the weights to inf
    assert "non-finite loss nan" in one_line_error(e) and "at step 2:" in str(e.value.code)


def test_missing_data_is_one_line(tmp_path):
    for flags in (["--dataset", "imagefolder", "--data-path", str(tmp_path / "nope")],
                  ["--dataset", "fashion-mnist", "--data-path", str(tmp_path / "nope")],
                  ["--cached-path", str(tmp_path / "nope")]):
        with pytest.raises(SystemExit) as e:
            run(tmp_path, *flags)
        assert "nope" in one_line_error(e)


def test_batch_not_divisible_by_world_size_is_one_line(tmp_path):
    """Through the command line, as torchrun would start rank 0 of 2: exit 1 with one line on stderr."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    r = subprocess.run([sys.executable, str(HERE / "train.py"), *TINY, "--global-batch-size", "5", "--results-dir",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "train.py: error: --global-batch-size 5 is not divisible by the 2 processes"], r.stderr


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_demo_path(tmp_path):
    """The demo's path end to end on 40 synthetic IDX images: pixel tokens, grid, small-data metric, the report."""
    g = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", g.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    torch.set_num_threads(1)
    train.main(train.parse_args(["--demo", *TINY[2:], "--dataset", "fashion-mnist", "--data-path", str(tmp_path),
                                 "--patch", "7", "--results-dir", str(tmp_path / "out"), "--global-batch-size", "8",
                                 "--max-steps", "2", "--eval-samples", "20", "--num-iter", "2", "--grid-per-class",
                                 "1", "--metric-cache", str(tmp_path / "metric.pt")]))
    log = (tmp_path / "out" / "log.txt").read_text()
    assert (tmp_path / "out" / "grid_0000002.png").exists() and "conditional accuracy" in log and "3x3 blur" in log
    from PIL import Image
    assert Image.open(tmp_path / "out" / "grid_0000002.png").size == (28, 280)  # a row per class
