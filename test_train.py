"""Tests of train.py: the recipe's pieces against closed forms (lr warmup, EMA,
clipping, weight-decay groups, label dropout), DDP on 2 gloo processes, exact resume,
plain-data checkpoints (their "data" entry), one-line errors for bad flags, the demo path
and the benchmark. Tiny configs on random tokens, fp32 on CPU. Own image folders:
test_data.py."""
import hashlib
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import bench
import checkpoints
import emigm
import train

HERE = Path(__file__).parent
# A few-thousand-parameter eMIGM: 16 tokens of 49 channels (the Tiny preset's shape), width 32,
# 1 + 1 blocks.
TINY = ["--size", "Tiny", "--dataset", "random", "--width", "32", "--depth", "1",
        "--num-heads", "2", "--head-depth", "1", "--head-width", "32", "--buffer-size", "2",
        "--blr", "1e-2", "--warmup-epochs", "0.5", "--log-every", "1"]
TINY_MODEL = dict(width=32, depth=1, num_heads=2, head_depth=1, head_width=32, buffer_size=2)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread inside each test: tiny models on a shared machine
    (conftest.py restores the count after)."""
    torch.set_num_threads(1)


def run(out, *flags):
    """train.py's run on TINY with `flags` (later flags win) into results folder `out`."""
    argv = [*TINY, "--results-dir", str(out), *flags]
    return train.run(train.build_parser(argv).parse_args(argv))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    training = run(out, "--global-batch-size", "8", "--max-steps", "3")
    state = {"model": training.model.state_dict(), "ema": training.ema.state_dict()}
    torch.save(state, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_stay_in_sync(tmp_path):
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs between ranks"
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0] == train.CSV_HEADER.strip() and len(rows) == 4
    assert all(np.isfinite(float(row.split(",")[2])) for row in rows[1:])
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["step"] == 3 and len(checkpoint["rng"]) == 2  # both ranks' RNG, to resume


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps at 4 steps per epoch (256 random examples, batch 64), warmup 2 steps, then cosine; a
    numbered checkpoint at step 3, mid-epoch."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    torch.set_num_threads(1)
    training = run(out, "--global-batch-size", "64", "--max-steps", "6", "--ckpt-every", "3",
                   "--lr-schedule", "cosine")
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)
    return out, training


def test_resume_is_exact(straight, tmp_path):
    """6 steps straight == 3 steps, stop, resume in the checkpoint's own folder, 3 more: weights,
    EMA and optimizer state bitwise equal."""
    out, training = straight
    # the folder holds that run: --resume continues it
    shutil.copy(out / "ckpt_0000003.pt", tmp_path)
    resumed = run(tmp_path, "--global-batch-size", "64", "--max-steps", "6", "--lr-schedule",
                  "cosine", "--resume", str(tmp_path / "ckpt_0000003.pt"))
    rows = (tmp_path / "log.csv").read_text().splitlines()[1:]  # a restart at 0 would also match
    assert [int(row.split(",")[0]) for row in rows] == [4, 5, 6]
    for a, b in ((training.model, resumed.model), (training.ema, resumed.ema)):
        state_a = a.state_dict()
        state_b = b.state_dict()
        assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    adam_a = torch.load(out / "last.pt", weights_only=True)["optimizer"]["state"]
    adam_b = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(adam_a[i]["exp_avg_sq"], adam_b[i]["exp_avg_sq"]) for i in adam_a)


def test_checkpoint_is_plain_data(straight):
    out, training = straight
    checkpoint = torch.load(out / "last.pt", weights_only=True)  # no pickled classes
    keys = {"model", "ema", "optimizer", "step", "epoch", "args", "config", "rng"}
    assert keys <= set(checkpoint) and isinstance(checkpoint["args"], dict)
    assert checkpoint["step"] == 6 and checkpoint["epoch"] == 1.5
    assert checkpoint["args"]["global_batch_size"] == 64
    assert checkpoint["config"] == training.model.config
    assert checkpoint["data"] == dict(tokenizer=None, img_size=256, patch=None, channels=None,
                                      class_names=None)  # random tokens: no images
    rebuilt = emigm.EMIGM(**checkpoint["config"])
    # what sample.py does: EMA weights into a model of the config
    checkpoints.load_weights(rebuilt, checkpoint)
    assert not (out / "last.pt.tmp").exists()  # written to a temporary file, then renamed


def test_lr_warmup_and_cosine_closed_form(straight):
    """lr_at against lr x step / W for step < W, then lr x (1 + cos(pi (step - W) / (T - W))) / 2;
    and the lr the loop used at each step (log.csv, 6 digits) against the same closed form (lr =
    1e-2 x 64 / 256, W = 0.5 epoch x 4 steps = 2, T = 6). A warmup shifted by one step fails at step
    0 or at W - 1."""
    lr = 1e-3
    assert train.lr_at(0, lr, 10, 100) == 0.0
    assert train.lr_at(1, lr, 10, 100) == pytest.approx(lr / 10, rel=1e-12)
    assert train.lr_at(9, lr, 10, 100) == pytest.approx(lr * 9 / 10, rel=1e-12)
    assert train.lr_at(10, lr, 10, 100) == lr
    assert train.lr_at(99, lr, 10, 100) == lr  # constant after the warmup (official)
    assert train.lr_at(10, lr, 10, 100, "cosine") == lr
    assert train.lr_at(55, lr, 10, 100, "cosine") == pytest.approx(lr / 2, rel=1e-12)
    rows = (straight[0] / "log.csv").read_text().splitlines()[1:]
    used = [float(row.split(",")[3]) for row in rows]  # the row after step s: the lr of step s - 1
    base = 1e-2 * 64 / 256
    cosine = [base * (1 + math.cos(math.pi * (s - 2) / 4)) / 2 for s in range(2, 6)]
    expected = [0.0, base / 2, *cosine]
    assert used == pytest.approx(expected, rel=1e-5, abs=1e-12)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return train.build_model("Tiny", overrides={**TINY_MODEL, **overrides})


def random_batch(model, batch=16):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(batch, model.seq_len, model.token_channels, generator=generator)
    return tokens, torch.arange(batch) % model.num_classes


def test_weight_decay_groups_by_name():
    """The official groups: decay 0.02 on the 2-D weights, class_emb, fake_latent and the pos-
    embeds; none on 1-D params (LayerNorm weights, biases) and on anything of the diffusion head."""
    training = train.Training(tiny_model(), lr=1e-3, weight_decay=0.02)
    names = {id(param): name for name, param in training.model.named_parameters()}
    decay_group, no_decay_group = training.optimizer.param_groups
    assert decay_group["weight_decay"] == 0.02 and no_decay_group["weight_decay"] == 0.0
    decay = {names[id(param)] for param in decay_group["params"]}
    no_decay = {names[id(param)] for param in no_decay_group["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert {"class_emb.weight", "fake_latent", "encoder_pos_embed_learned",
            "z_proj.weight", "decoder_pos_embed_learned", "diffusion_pos_embed_learned",
            "decoder_embed.weight"} <= decay
    assert {"z_proj.bias", "z_proj_ln.weight", "z_proj_ln.bias",
            "encoder_norm.weight"} <= no_decay
    exempt = [name for name in names.values() if name.endswith(".bias") or "norm" in name]
    assert set(exempt) <= no_decay
    assert all(name in no_decay for name in names.values() if name.startswith("diffloss."))
    assert any(name.startswith("diffloss.") and name.endswith(".weight") for name in no_decay)


def test_ema_update_closed_form(tmp_path):
    """Each step ema' = d x ema + (1 - d) x new weights (d = 0.9; fp32, two roundings, so rel 1e-6);
    swapping d and 1 - d moves it by 0.8 x (ema - weights). Checked at the third step (before, the
    head's zero init keeps some gradients at 0). Through run(): --ema-decay 0 makes the EMA the
    model itself."""
    training = train.Training(tiny_model(), lr=1e-2, weight_decay=0.02, ema_decay=0.9)
    batch = random_batch(training.model)
    for _ in range(2):
        training.step(*batch)
    weights = [param.detach().clone() for param in training.model.parameters()]
    emas = [ema.detach().clone() for ema in training.ema.parameters()]
    training.step(*batch)
    changed = 0
    pairs = zip(training.model.parameters(), training.ema.parameters())
    for before, old_ema, (param, ema) in zip(weights, emas, pairs):
        changed += not torch.equal(before, param)
        torch.testing.assert_close(ema, 0.9 * old_ema + 0.1 * param.detach(), rtol=1e-6, atol=1e-9)
    assert changed == len(weights)  # every weight moved, so a swapped decay shows everywhere
    trained = run(tmp_path, "--global-batch-size", "64", "--max-steps", "2", "--ema-decay", "0")
    for param, ema in zip(trained.model.parameters(), trained.ema.parameters()):
        assert torch.equal(param, ema)


class Scaled(torch.nn.Module):
    """The model's loss times `factor`: a gradient `factor` times larger."""

    def __init__(self, model, factor):
        super().__init__()
        self.model = model
        self.factor = factor

    def forward(self, tokens, labels):
        return self.model(tokens, labels) * self.factor


@pytest.mark.parametrize("grad_clip", [3.0, 0.0])
def test_gradient_clipping_bounds_the_update(grad_clip):
    """A step with a huge gradient (the loss x 1e5) through plain SGD with lr 1: the update is the
    clipped gradient, so its global L2 norm is grad_clip (rel 1e-4: the fp32 rounding of the step is
    ~1e-7); with --grad-clip 0 nothing is clipped and the update is the whole gradient."""
    model = Scaled(tiny_model(), 1e5)
    training = train.Training(model, lr=1.0, weight_decay=0.0, grad_clip=grad_clip)
    training.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [param.detach().double().clone() for param in model.parameters()]
    stats = training.step(*random_batch(model.model))
    after = [param.detach().double() for param in model.parameters()]
    update = torch.cat([(new - old).flatten() for new, old in zip(after, before)])
    assert stats["grad_norm"] > 1000 * 3.0  # the gradient really is huge
    expected = grad_clip if grad_clip > 0 else stats["grad_norm"]
    assert update.norm().item() == pytest.approx(expected, rel=1e-4)


def test_label_dropout_reaches_the_fake_class_in_training(tmp_path, monkeypatch):
    """In the training loop each label becomes the fake class embedding with probability 0.1 (the
    paper's; the Tiny preset keeps it): 20 steps of 64 labels = 1280 draws, Binomial(1280, 0.1) has
    mean 128 and sd 10.7; the test accepts 128 +- 5 sd (a false alarm about once in 1.7 million),
    dropout off gives 0."""
    draws = []
    class_embedding = emigm.EMIGM.class_embedding

    def recording(self, labels, *args, **kwargs):
        embedding = class_embedding(self, labels, *args, **kwargs)  # (B, D)
        dropped = (embedding == self.fake_latent.to(embedding.dtype)).all(dim=-1)  # (B,)
        draws.append((self.training, int(dropped.sum()), len(labels)))
        return embedding
    monkeypatch.setattr(emigm.EMIGM, "class_embedding", recording)
    run(tmp_path, "--global-batch-size", "64", "--max-steps", "20")
    assert len(draws) == 20 and all(training for training, _, _ in draws)
    assert sum(count for _, _, count in draws) == 1280
    assert abs(sum(dropped for _, dropped, _ in draws) - 128) <= 5 * math.sqrt(1280 * 0.1 * 0.9)


def test_default_batch_follows_the_size(tmp_path):
    """The official batch per GPU: 32 for XS and S, 64 for B, L, H; --global-batch-size left out is
    that times the number of processes, and lr = blr x global batch / 256."""
    cases = (("XS", 1, 32), ("S", 2, 64), ("B", 1, 64), ("L", 4, 256), ("H", 1, 64))
    for size, world_size, expected in cases:
        argv = ["--size", size, "--dataset", "random", "--results-dir", str(tmp_path / size)]
        args = train.check_args(train.build_parser(argv).parse_args(argv), world_size)
        assert args.global_batch_size == expected
        assert args.lr == pytest.approx(1e-4 * expected / 256)


def snapshot(folder):
    return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(folder).rglob("*")) if path.is_file()}


# Bad command lines: (flags added to TINY with a fresh --results-dir, a text the one-line error
# must contain).
# {run} is a finished run's folder, {file} a regular file, {missing} a path that does not exist,
# {truncated} a checkpoint cut in half, {fashion} 40 images in Fashion-MNIST's format.
BAD_INPUTS = [
    (["--global-batch-size", "0"], "--global-batch-size"),
    (["--max-steps", "0"], "--max-steps"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--blr", "0"], "--blr"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["--ema-decay", "-0.1"], "--ema-decay"),
    (["--t-min", "1"], "--t-min"),
    (["--t-min", "1.5"], "--t-min"),
    (["--label-drop-prob", "-0.1"], "--label-drop-prob"),
    (["--dropout", "1.2"], "--dropout"),
    (["--eval-samples", "0"], "--eval-samples"),
    (["--log-every", "0"], "--log-every"),
    (["--save-every", "0"], "--save-every"),
    (["--ckpt-every", "-1"], "--ckpt-every"),
    (["--sample-every", "-1"], "--sample-every"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--seed", "-1"], "--seed"),
    (["--cfg-interval", "0.5", "0.2"], "--cfg-interval"),
    (["--cfg-interval", "0.1", "1.5"], "--cfg-interval"),
    (["--cfg", "-2"], "--cfg"),
    (["--cfg", "0.5"], "--cfg"),
    (["--num-iter", "0"], "--num-iter"),
    (["--head-steps", "0"], "--head-steps"),
    (["--grid-per-class", "0"], "--grid-per-class"),
    (["--diffusion-batch-mul", "0"], "--diffusion-batch-mul"),
    (["--depth", "0"], "--depth"),
    (["--width", "33"], "--width 33 is not divisible by --num-heads 2"),
    (["--size", "H", "--img-size", "512"], "--size H --img-size 512"),
    (["--dataset", "fashion-mnist", "--patch", "5"], "--patch"),
    (["--dataset", "imagefolder"], "--data-path"),
    (["--dataset", "imagefolder", "--data-path", "{missing}", "--vae", "{file}"], "--data-path"),
    (["--dataset", "fashion-mnist", "--data-path", "{missing}"], "--data-path"),
    (["--cached-path", "{missing}"], "--cached-path"),
    (["--vae", "{missing}"], "--vae"),
    (["--dataset", "fashion-mnist", "--data-path", "{fashion}", "--patch", "7",
      "--global-batch-size", "64"], "--global-batch-size 64 is more than the 40 examples"),
    (["--results-dir", "{file}/sub"], "--results-dir"),
    (["--results-dir", "{run}"], "--results-dir"),
    (["--resume", "{missing}"], "--resume"),
    (["--resume", "{truncated}"], "--resume"),
    (["--resume", "{file}"], "--resume"),
    (["--resume", "{run}/last.pt", "--width", "48"], "--resume"),
]


@pytest.mark.parametrize("flags, flag", BAD_INPUTS, ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_input_is_a_one_line_error(flags, flag, straight, fashion_folder, tmp_path, capsys):
    """Exit status 2, no traceback, the flag named in the last line, and nothing written: the
    finished run's folder is byte for byte the same and the fresh results folder holds no file."""
    run_dir = straight[0]
    (tmp_path / "file").write_text("not a folder, not a checkpoint")
    (tmp_path / "truncated.pt").write_bytes((run_dir / "last.pt").read_bytes()[:5000])
    paths = dict(run=run_dir, file=tmp_path / "file", missing=tmp_path / "missing",
                 truncated=tmp_path / "truncated.pt", fashion=fashion_folder)
    before = snapshot(run_dir)
    fresh = tmp_path / "fresh"
    argv = [*TINY, "--results-dir", str(fresh), *(text.format(**paths) for text in flags)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "Traceback" not in captured.out + captured.err
    last_line = captured.err.strip().splitlines()[-1]
    assert "error:" in last_line and flag in last_line, captured.err
    assert snapshot(run_dir) == before
    assert not fresh.exists() or not any(fresh.iterdir())


def test_non_finite_loss_stops_naming_the_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # step 1 sends the weights to inf
        train.main([*TINY, "--results-dir", str(tmp_path), "--lr", "1e30", "--warmup-epochs", "0",
                    "--max-steps", "5"])
    message = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in message
    assert "non-finite loss nan at step 2:" in message


def test_batch_not_divisible_by_world_size_through_the_command_line(tmp_path):
    """As torchrun would start rank 0 of 2: exit 2 with one line on stderr, before any process
    group."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    command = [sys.executable, str(HERE / "train.py"), *TINY, "--global-batch-size", "5",
               "--results-dir", str(tmp_path / "out")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    message = ("train.py: error: --global-batch-size 5 is not divisible by the 2 processes: "
               "pass a multiple")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == [message], result.stderr
    assert not (tmp_path / "out").exists()


def test_fashion_mnist_demo_path(fashion_folder, tmp_path):
    """The demo's path end to end on 40 synthetic IDX images: pixel tokens, grid, small-data metric,
    report."""
    out = tmp_path / "out"
    train.main(["--demo", *TINY[2:], "--dataset", "fashion-mnist", "--data-path",
                str(fashion_folder), "--patch", "7", "--results-dir", str(out),
                "--global-batch-size", "8", "--max-steps", "2",
                "--eval-samples", "20", "--num-iter", "2", "--grid-per-class", "1",
                "--metric-cache", str(tmp_path / "metric.pt")])
    log = (out / "log.txt").read_text()
    assert "conditional accuracy" in log and "3x3 blur" in log and "2x2 blur" in log
    from PIL import Image
    # a row per class, named (Fashion-MNIST's names in a left margin)
    width, height = Image.open(out / "grid_0000002.png").size
    assert height == 280 and width > 28
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
             "Sneaker", "Bag", "Ankle boot"]
    assert checkpoint["data"] == dict(tokenizer="pixel", img_size=28, patch=7, channels=1,
                                      class_names=names)


def test_bench_runs_the_training_step(capsys, monkeypatch):
    """--bench on the tiny model: its steps, FLOPs and report (the 2048^3 peak probe replaced by 1
    TFLOP/s)."""
    monkeypatch.setattr(bench, "matmul_peak_flops", lambda device: 1e12)
    train.main(["--bench", *TINY[:2], *TINY[4:16], "--global-batch-size", "4"])
    report = capsys.readouterr().out
    assert "eMIGM-Tiny, 16 tokens x 49 ch, batch 4" in report
    assert "of the fp32 matmul peak" in report
