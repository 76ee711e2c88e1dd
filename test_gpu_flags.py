"""Tests of train.py's flags for smaller GPUs (issue 14): --accum-steps (the micro-batches' gradients
are the batch's up to fp32 rounding; DDP all-reduces once per step), --grad-checkpointing (the same
loss and gradients, bit for bit on CPU, the same state_dict keys), --precision (finite bf16 and fp16
steps; fp16's GradScaler: a skipped update on overflow, its state through an exact resume), one-line
errors, the memory table of bench.py. Tiny models, a few steps.

EMIGM_TEST_DEVICE=cuda runs the in-process tests on the GPU (.ci/gpu); the runs through train.run
take the GPU wherever there is one. Under torchrun the DDP test joins torchrun's rendezvous (NCCL
on CUDA, gloo on CPU).
"""
import copy
import hashlib
import math
import os
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import bench
import emigm
import train
from test_emigm import tiny_reference_model

HERE = Path(__file__).parent
DEVICE = torch.device(os.environ.get("EMIGM_TEST_DEVICE", "cpu"))
EXACT = DEVICE.type == "cpu"  # CUDA kernels may sum in another order from run to run
# the tiny eMIGM of test_train.py: 16 tokens of 49 channels, width 32, 1 + 1 blocks
TINY = ["--size", "Tiny", "--dataset", "random", "--width", "32", "--depth", "1",
        "--num-heads", "2", "--head-depth", "1", "--head-width", "32", "--buffer-size", "2",
        "--blr", "1e-2", "--warmup-epochs", "0.5", "--log-every", "1"]
TINY_MODEL = dict(width=32, depth=1, num_heads=2, head_depth=1, head_width=32, buffer_size=2)
# the official reference of test_emigm.py (ML-GSAI/eMIGM at de78623, fp32)
REF = torch.load(HERE / "testdata" / "emigm_tiny_reference.pt", weights_only=True)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # tiny models on a shared machine (conftest.py restores the count)


def run(out, *flags):
    """train.py's run on TINY with `flags` (later flags win) into results folder `out`."""
    argv = [*TINY, "--results-dir", str(out), *flags]
    return train.run(train.build_parser(argv).parse_args(argv))


def tiny_model(**overrides):
    """The tiny model with every weight moved off its init: at init the head's last layer is zero,
    so no gradient would reach the transformer."""
    torch.manual_seed(0)
    model = train.build_model("Tiny", overrides={**TINY_MODEL, **overrides})
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.to(DEVICE)


def random_batch(model, batch=16):
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(batch, model.seq_len, model.token_channels, generator=generator)
    return tokens.to(DEVICE), (torch.arange(batch) % model.num_classes).to(DEVICE)


def rel_err(ours, ref):
    """max |ours - ref| / max |ref| in fp64 (0 where both are 0)."""
    scale = ref.double().abs().max().clamp_min(1e-30)
    return ((ours.double() - ref.double()).abs().max() / scale).item()


def gradients(model):
    return [param.grad.detach().clone() for param in model.parameters()]


# ---- --accum-steps
class FixedHead(torch.nn.Module):
    """The model with the head's steps and noise of a whole batch fixed (EMIGM.forward's replay
    keywords), sliced to the rows of whichever micro-batch comes in (found by its tokens)."""

    def __init__(self, model, batch_tokens, head_t, head_noise):
        super().__init__()
        self.model = model
        self.batch_tokens = batch_tokens
        B, L, C = batch_tokens.shape
        self.head_t = head_t.view(-1, B, L)  # (mul, B, L)
        self.head_noise = head_noise.view(-1, B, L, C)  # (mul, B, L, C)

    def forward(self, tokens, labels, mask=None, t=None):
        same = (tokens[:, None] == self.batch_tokens[None]).flatten(2).all(dim=2)  # (b, B)
        rows = same.float().argmax(dim=1)  # each row of random tokens is unique
        head_t = self.head_t[:, rows].flatten()
        head_noise = self.head_noise[:, rows].flatten(0, 2)
        return self.model(tokens, labels, mask, t, head_t, head_noise)


# (model overrides, how the masks are drawn): eMIGM's one t per batch (equal counts per row), and
# MDM's weighting without MAE: t per row, rows with different counts of masked tokens
MASKINGS = {
    "one-t": (dict(), partial(emigm.sample_mask, schedule="exp", t_min=0.2)),
    "per-row": (dict(loss_weighting="mdm", use_mae=False, mask_schedule="linear"),
                partial(emigm.sample_mask_per_row, schedule="linear")),
}


@pytest.mark.parametrize("masking", list(MASKINGS))
def test_accumulated_gradients_equal_the_full_batch(masking):
    """For fixed masks, t and head noise: 4 micro-batches of 4 give the loss and gradients of one
    forward of the 16 rows, up to fp32 rounding (measured <= 1.1e-6 of each tensor's largest
    entry; bound 1e-5). With per-row masking (rows of 0-16 masked tokens) the
    weights by share make it exact: equal weights of 1/4 miss the loss by 2.7%."""
    overrides, draw_mask = MASKINGS[masking]
    model = tiny_model(label_drop_prob=0.0, **overrides)
    tokens, labels = random_batch(model)
    B, L, C = tokens.shape
    generator = torch.Generator().manual_seed(2)
    mask, t = draw_mask(B, L, generator=generator)
    if torch.is_tensor(t):
        t = t.to(DEVICE)
    mask = mask.to(DEVICE)
    rows = B * L * model.diffusion_batch_mul
    head_t = torch.randint(0, 1000, (rows,), generator=generator).to(DEVICE)
    head_noise = torch.randn(rows, C, generator=generator).to(DEVICE)
    if masking == "per-row":
        assert len(set(mask.sum(dim=1).tolist())) > 4  # rows of many counts
    # one forward of the whole batch
    full = copy.deepcopy(model)
    loss = full(tokens, labels, mask, t, head_t, head_noise)
    loss.backward()
    # train.py's micro-batches
    training = train.Training(model, lr=1e-3, weight_decay=0.02, accum_steps=4)
    training.train_model = FixedHead(model, tokens, head_t, head_noise)
    accumulated = training.forward_backward(tokens, labels, mask, t)
    assert rel_err(accumulated, loss.detach()) <= 1e-6
    errors = [rel_err(a, b) for a, b in zip(gradients(model), gradients(full))]
    print(f"{masking}: largest relative gradient difference {max(errors):.1e}")
    assert max(errors) <= 1e-5
    assert sum(grad.abs().max() > 0 for grad in gradients(full)) >= len(errors) - 2  # all flow


def test_accumulation_draws_one_mask_for_the_batch(monkeypatch):
    """--accum-steps 4 draws the batch's mask and t as one forward of the batch does, from the same
    random stream: the micro-batches' masks, stacked, are that forward's mask (one t, equal counts)."""
    masks = []
    forward_encoder = emigm.EMIGM.forward_encoder

    def recording(self, tokens, mask, class_emb):
        masks.append(mask.clone())
        return forward_encoder(self, tokens, mask, class_emb)
    monkeypatch.setattr(emigm.EMIGM, "forward_encoder", recording)
    model = tiny_model()
    batch = random_batch(model)
    for accum_steps in (1, 4):
        training = train.Training(copy.deepcopy(model), 1e-3, 0.02, accum_steps=accum_steps)
        torch.manual_seed(5)
        training.forward_backward(*batch)
    assert len(masks) == 5 and all(len(mask) == 4 for mask in masks[1:])
    assert torch.equal(torch.cat(masks[1:]), masks[0])


def counting_allreduce(calls, bucket):
    calls.append(bucket.index())
    return default_hooks.allreduce_hook(None, bucket)


def test_ddp_all_reduces_once_per_step(tmp_path):
    """One DDP process (gloo on CPU, NCCL on CUDA; torchrun's rendezvous where there is one): a
    step in 4 micro-batches all-reduces each gradient bucket once, as a step in one (no_sync on
    the inner 3), and its gradients are the plain model's."""
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if DEVICE.type == "cuda" else "gloo"
        init = "env://" if "MASTER_ADDR" in os.environ else f"file://{tmp_path / 'store'}"
        dist.init_process_group(backend, init_method=init, rank=0, world_size=1)
    try:
        calls = {}
        grads = {}
        for accum_steps, ddp in ((1, True), (4, True), (4, False)):
            training = train.Training(tiny_model(), 1e-3, 0.02, ddp=ddp, accum_steps=accum_steps)
            calls[accum_steps, ddp] = []
            if ddp:
                training.train_model.register_comm_hook(calls[accum_steps, ddp], counting_allreduce)
            torch.manual_seed(3)
            training.forward_backward(*random_batch(training.model))
            grads[accum_steps, ddp] = gradients(training.model)
    finally:
        if created:
            dist.destroy_process_group()
    assert len(calls[1, True]) >= 1 and len(calls[4, True]) == len(calls[1, True])
    errors = [rel_err(a, b) for a, b in zip(grads[4, True], grads[4, False])]
    assert max(errors) <= (0 if EXACT else 1e-6)


# ---- --grad-checkpointing
def test_grad_checkpointing_same_loss_gradients_and_keys():
    """With dropout 0.1 and label dropout on: 3 steps with and without --grad-checkpointing from one
    seed give bit-equal losses, gradients and weights on CPU (measured: 0 difference), every block
    runs twice per step (the recompute), and the state_dict keys are a plain model's: the weights
    load into one either way."""
    model = tiny_model(attn_dropout=0.1, proj_dropout=0.1, depth=2)
    plain = train.Training(copy.deepcopy(model), 1e-2, 0.02)
    checkpointed = train.Training(copy.deepcopy(model), 1e-2, 0.02, grad_checkpointing=True)
    calls = []
    for block in [*checkpointed.model.encoder_blocks, *checkpointed.model.decoder_blocks]:
        block.norm1.register_forward_hook(partial(counting_hook, calls))
    batch = random_batch(model)
    results = []
    for training in (plain, checkpointed):
        torch.manual_seed(4)  # once: the random stream must stay aligned over the steps
        steps = []
        for _ in range(3):
            stats = training.step(*batch)
            steps.append((stats["loss"], gradients(training.model)))
        results.append(steps)
    tolerance = 0 if EXACT else 1e-5
    for (loss_a, grads_a), (loss_b, grads_b) in zip(*results):
        assert abs(loss_b - loss_a) <= tolerance * abs(loss_a)
        assert max(rel_err(b, a) for a, b in zip(grads_a, grads_b)) <= tolerance
    assert len(calls) == 3 * 4 * 2  # 3 steps, 4 blocks, forward and recompute
    state = checkpointed.model.state_dict()
    assert list(state) == list(model.state_dict())
    fresh = emigm.EMIGM(**model.config)
    fresh.load_state_dict(state)  # strict
    checkpointed.model.load_state_dict(fresh.state_dict())


def counting_hook(calls, module, inputs, output):
    calls.append(module)


# ---- --precision
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite(precision):
    """3 steps under autocast (on CPU too, slowly): the transformer's matmuls run in bf16 / fp16,
    the loss and gradient norm stay finite, every step updates the weights."""
    model = tiny_model()
    dtypes = []
    model.encoder_blocks[0].mlp.fc1.register_forward_hook(partial(record_dtype, dtypes))
    training = train.Training(model, 1e-3, 0.02, precision=precision)
    torch.manual_seed(0)
    for _ in range(3):
        before = [param.detach().clone() for param in model.parameters()]
        stats = training.step(*random_batch(model))
        assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
        assert not stats["skipped"]
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert dtypes == [expected] * 3
    assert training.scaler.is_enabled() == (precision == "fp16")


def record_dtype(dtypes, module, inputs, output):
    dtypes.append(output.dtype)


def test_fp16_overflow_skips_the_update_and_logs_it(tmp_path, monkeypatch):
    """A loss scale of 2^60 overflows fp16's gradients: both steps skip the update (the weights stay
    at their init), each is logged, and the scale halves per step (GradScaler's backoff)."""
    monkeypatch.setattr(torch.amp, "GradScaler", partial(torch.amp.GradScaler, init_scale=2.0**60))
    argv = [*TINY, "--results-dir", str(tmp_path), "--precision", "fp16", "--max-steps", "2"]
    args = train.build_parser(argv).parse_args(argv)
    torch.manual_seed(args.seed)
    initial = train.build_model("Tiny", overrides=train.model_overrides(args)).state_dict()
    training = train.run(args)
    log = (tmp_path / "log.txt").read_text()
    assert "step 1: fp16 overflow, update skipped" in log
    assert "step 2: fp16 overflow, update skipped" in log
    state = training.model.state_dict()
    assert all(torch.equal(initial[key], state[key].cpu()) for key in initial)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]["scale"] == 2.0**58


def file_states(path):
    checkpoint = torch.load(path, weights_only=True)
    return checkpoint["model"], checkpoint["ema"], checkpoint["scaler"]


def test_fp16_resume_is_exact_and_keeps_the_loss_scale(tmp_path):
    """--precision fp16 --accum-steps 2 --grad-checkpointing: 4 steps straight == 2 steps, resume,
    2 more (bitwise on CPU), and the GradScaler state (scale, growth tracker) comes back from the
    checkpoint: without it the tracker would read 2, not 4."""
    flags = ["--precision", "fp16", "--accum-steps", "2", "--grad-checkpointing",
             "--global-batch-size", "16", "--max-steps", "4", "--dropout", "0.1"]
    straight = tmp_path / "straight"
    run(straight, *flags, "--ckpt-every", "2")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "ckpt_0000002.pt").write_bytes((straight / "ckpt_0000002.pt").read_bytes())
    run(resumed, *flags, "--resume", str(resumed / "ckpt_0000002.pt"))
    model_a, ema_a, scaler_a = file_states(straight / "last.pt")
    model_b, ema_b, scaler_b = file_states(resumed / "last.pt")
    assert scaler_a == scaler_b and scaler_a["_growth_tracker"] == 4
    for a, b in ((model_a, model_b), (ema_a, ema_b)):
        errors = [rel_err(b[key], a[key]) for key in a]
        assert max(errors) <= (0 if EXACT else 1e-3)


# ---- the command line
def test_log_names_the_global_batch_and_precision(tmp_path):
    run(tmp_path, "--global-batch-size", "16", "--accum-steps", "4", "--grad-checkpointing",
        "--max-steps", "1", "--precision", "fp32")
    log = (tmp_path / "log.txt").read_text()
    assert "fp32, global batch 16 (4 micro-batch(es) of 4 per process), lr 0.000625," in log


def snapshot(folder):
    return {path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(Path(folder).rglob("*")) if path.is_file()}


BAD_INPUTS = [
    (["--global-batch-size", "8", "--accum-steps", "3"],
     "--accum-steps 3 does not divide the 8 examples per process: pass a divisor"),
    (["--accum-steps", "0"], "--accum-steps"),
    (["--accum-steps", "-2"], "--accum-steps"),
    (["--accum-steps", "two"], "--accum-steps"),
    (["--precision", "fp8"], "--precision"),
    (["--precision"], "--precision"),
    (["--bench", "--global-batch-size", "8", "--accum-steps", "3"],
     "--accum-steps 3 does not divide the batch 8: pass a divisor"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS, ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_input_is_a_one_line_error(flags, message, tmp_path, capsys):
    """Exit status 2, no traceback, one line naming the flag, nothing written."""
    (tmp_path / "keep").write_text("a file already there")
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--results-dir", str(out), *flags])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert "Traceback" not in captured.out + captured.err
    last_line = captured.err.strip().splitlines()[-1]
    assert "error:" in last_line and message in last_line, captured.err
    assert snapshot(tmp_path) == before and not out.exists()


def test_accumulation_must_divide_the_batch_of_each_process(tmp_path):
    """2 processes of 4 examples: --accum-steps 8 divides the global batch, not a process's."""
    argv = [*TINY, "--results-dir", str(tmp_path), "--global-batch-size", "8", "--accum-steps", "8"]
    with pytest.raises(ValueError, match="--accum-steps 8 does not divide the 4 examples per"):
        train.check_args(train.build_parser(argv).parse_args(argv), world_size=2)


# ---- fp32 on the device against the official code, and the memory table
def test_fp32_loss_and_gradients_on_the_device_match():
    """The official tiny model's training loss (fixed mask, steps, noise) in fp32 on DEVICE: within
    test_emigm.py's FP32_TOL (1e-5) of the official vector, and its gradients within 1e-5 of the
    CPU's (on CPU: the CPU against itself)."""
    # eval: no dropouts, the same function on both devices
    model = tiny_reference_model()
    ref = REF["full_forward"]
    tokens = ref["imgs"].flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
    inputs = (tokens, ref["labels"], ref["mask"].bool(), None, ref["t"], ref["noise"])
    results = {}
    for device in ("cpu", DEVICE):
        on_device = copy.deepcopy(model).to(device)
        loss = on_device(*[x if x is None else x.to(device) for x in inputs])
        loss.backward()
        results[device] = (loss.detach().cpu(), [grad.cpu() for grad in gradients(on_device)])
    loss, grads = results[DEVICE]
    assert rel_err(loss, ref["loss"]) <= 1e-5
    assert max(rel_err(a, b) for a, b in zip(grads, results["cpu"][1])) <= 1e-5


def test_memory_table_runs_each_variant_in_a_fresh_process(capsys, monkeypatch):
    """bench.py train-memory on the tiny model, two of its variants: one row each, peak memory > 0."""
    variants = {"baseline": [], "--accum-steps 2": ["--accum-steps", "2"]}
    monkeypatch.setattr(bench, "MEMORY_VARIANTS", variants)
    bench.main(["train-memory", *TINY[:16], "--global-batch-size", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines[-2:]]
    assert [row[0] for row in rows] == ["baseline", "--accum-steps"]
    assert all(float(row[-4]) > 0 for row in rows)
