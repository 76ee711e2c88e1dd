"""Tests of the speed levers of emigm.py (issue 14): each computes the same function as the plain
computation it replaces, and --compile computes the same as eager mode.
- dropout on CPU: masks from 32-bit integers (P(zero) = p, the survivors scaled by 1 / (1 - p));
  attention dropout on SDPA's math path;
- the last decoder block only at the positions the head reads;
- the head's time embedding once per distinct step, SiLU(y) once for all adaLN layers;
- oneDNN's linear kernels on CPU (emigm.linear, training's OneDNNLinear), the weights prepacked while
  sampling (cli.packed_weights); freed memory kept for reuse (cli);
- torch.compile of the stacks and the head (train.py / sample.py --compile);
- bench.py compare, which times another checkout beside this one.
Run: python -m pytest -q test_speed.py"""
import contextlib
import copy
import os
import platform
import shutil
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import cli
import emigm
import sample
from test_emigm import FP32_TOL, rel_err, small_model, trained_looking


# ---- dropout
@pytest.mark.parametrize("p", [0.02, 0.1, 0.5])
def test_dropout_zeroes_a_share_p_and_scales_the_rest(p):
    """2M draws: the share zeroed is p within 5 binomial standard errors, in the even and
    odd elements alike (the two halves of each 64-bit draw); the rest is x / (1 - p)."""
    torch.manual_seed(0)
    x = torch.full((2000, 1000), 3.0)
    out = emigm.Dropout(p).train()(x)
    zero = out == 0
    tolerance = 5 * (p * (1 - p) / (x.numel() / 2)) ** 0.5
    for half in (zero.flatten()[0::2], zero.flatten()[1::2]):
        assert abs(half.float().mean().item() - p) < tolerance
    assert torch.equal(out[~zero], x[~zero] * (1 / (1 - p)))


def test_dropout_module_in_eval_and_at_zero_is_the_identity():
    x = torch.randn(4, 8)
    assert torch.equal(emigm.Dropout(0.1).eval()(x), x)
    assert torch.equal(emigm.Dropout(0.0).train()(x), x)


def test_dropout_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 64, requires_grad=True)
    out = emigm.Dropout(0.1).train()(x)
    out.sum().backward()
    expected = torch.where(out != 0, 1 / 0.9, 0.0)
    assert torch.allclose(x.grad, expected)


def test_attention_dropout_path_is_sdpa_with_that_mask(monkeypatch):
    """The CPU training path (math attention) with a given keep mask equals softmax(q k^T /
    sqrt(d)) with the dropped entries zeroed, times 1 / (1 - p), then v."""
    torch.manual_seed(2)
    attention = emigm.Attention(32, num_heads=2, attn_dropout=0.25, proj_dropout=0.0).train()
    x = torch.randn(3, 10, 32)
    keep = torch.rand(3, 2, 10, 10) > 0.25
    monkeypatch.setattr(emigm, "dropout_keep", lambda attn, p: keep)
    q, k, v = attention.qkv(x).reshape(3, 10, 3, 2, 16).permute(2, 0, 3, 1, 4)
    weights = F.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) * keep / 0.75
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(3, 10, 32))
    assert rel_err(attention(x), expected) <= FP32_TOL


# ---- the last decoder block at the positions read
def plain_decoder(model, x, mask):
    """forward_decoder as the official code computes it: every block at every position."""
    x = model.decoder_embed(x)
    keep = ~F.pad(mask, (model.buffer_size, 0), value=False)
    full = model.mask_token.expand(*keep.shape, -1).clone()
    full[keep] = x.reshape(-1, x.shape[-1])
    x = full + model.decoder_pos_embed_learned
    for block in model.decoder_blocks:
        x = x + block.attn(block.norm1(x))
        x = x + block.mlp(block.norm2(x))
    x = model.decoder_norm(x)
    return x[:, model.buffer_size:] + model.diffusion_pos_embed_learned


@pytest.mark.parametrize("depth", [1, 2])
def test_decoder_reads_only_the_positions_asked_for(depth):
    """z at the positions read (the same count per row, row-major) = the plain decoder's z
    there; without `read`, the plain decoder's z everywhere."""
    model = trained_looking(small_model(depth=depth)).eval()
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(3, 16, 4, generator=g)
    mask = torch.rand(3, 16, generator=g).argsort(1) < 6  # 6 masked per row
    read = torch.rand(3, 16, generator=g).argsort(1) < 5  # 5 read per row, anywhere
    with torch.no_grad():
        encoded = model.forward_encoder(tokens, mask, model.class_emb(torch.tensor([0, 1, 2])))
        plain = plain_decoder(model, encoded, mask)  # (3, 16, D)
        z_read = model.forward_decoder(encoded, mask, read)  # (3, 5, D)
        z_all = model.forward_decoder(encoded, mask)
    assert z_read.shape == (3, 5, 32)
    assert rel_err(z_read, plain[read].reshape(3, 5, -1)) <= FP32_TOL
    assert rel_err(z_all, plain) <= FP32_TOL


# ---- the head
def plain_head(net, x, t, c):
    """MAR's SimpleMLPAdaLN.forward: every row's time embedding, each adaLN its own SiLU."""
    h = net.input_proj(x)
    y = net.time_embed.mlp(time_frequencies(net.time_embed, t)) + net.cond_embed(c)
    for block in net.res_blocks:
        shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
        h = h + gate * block.mlp(block.in_ln(h) * (1 + scale) + shift)
    shift, scale = net.final_layer.adaLN_modulation(y).chunk(2, dim=-1)
    return net.final_layer.linear(net.final_layer.norm_final(h) * (1 + scale) + shift)


def time_frequencies(embedder, t):
    half = embedder.freq_dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_head_embeds_each_distinct_step_once_and_broadcasts_one_time():
    """Steps drawn with repeats (training) and one time for all rows (the samplers) give
    MAR's per-row function."""
    net = trained_looking(small_model()).diffloss.net.eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 4, generator=g)
    c = torch.randn(50, 32, generator=g)
    t = torch.randint(0, 10, (50,), generator=g)  # many repeats
    with torch.no_grad():
        assert rel_err(net(x, t, c), plain_head(net, x, t, c)) <= FP32_TOL
        one = torch.tensor([412.5])
        expected = plain_head(net, x, one.expand(50), c)
        assert rel_err(net(x, one, c), expected) <= FP32_TOL


# ---- oneDNN's kernels on CPU
def spy_onednn(monkeypatch):
    """Record each call of oneDNN's linear op as (input shape, weight packed?)."""
    calls = []
    onednn = torch.ops.mkldnn._linear_pointwise
    def spy(*args):
        calls.append((tuple(args[0].shape), args[1].is_mkldnn))
        return onednn(*args)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    return calls


def test_linear_takes_onednn_only_in_eager_fp32_on_cpu(monkeypatch):
    """emigm.linear calls oneDNN's kernel in fp32 on CPU, without autograd and with it
    (OneDNNLinear: its output and input gradient); in fp64, under autocast or with ONEDNN
    off, F.linear, bit for bit."""
    calls = spy_onednn(monkeypatch)
    g = torch.Generator().manual_seed(8)
    layer = emigm.Linear(64, 96)
    x = torch.randn(3, 7, 64, generator=g)
    expected = F.linear(x, layer.weight, layer.bias)
    with torch.no_grad():
        assert rel_err(layer(x), expected) <= FP32_TOL
        assert calls == [((3, 7, 64), False)]
        layer.double()(x.double())
        with torch.autocast("cpu", torch.bfloat16):
            layer.float()(x)
        monkeypatch.setattr(emigm, "ONEDNN", False)
        assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x), expected)  # autograd, ONEDNN off
    monkeypatch.setattr(emigm, "ONEDNN", True)
    layer(x).sum().backward()  # the output; x needs no gradient: no second call
    assert calls == [((3, 7, 64), False)] * 2
    layer(x.requires_grad_()).sum().backward()  # the output, then the input gradient
    assert calls == [((3, 7, 64), False)] * 3 + [((3, 7, 96), False)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 64)])
def test_onednn_linear_gradients_equal_torch_linear(shape, bias):
    """OneDNNLinear (training's linear layers on CPU) has F.linear's output and gradients for
    the input, weight and bias, within fp32 rounding; also for a non-contiguous output grad."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    weight = torch.randn(96, 64, generator=g, requires_grad=True)
    bias = torch.randn(96, generator=g, requires_grad=True) if bias else None
    inputs = [x, weight] + ([bias] if bias is not None else [])
    grad = torch.randn(96, *shape[:-1], generator=g).movedim(0, -1)  # non-contiguous
    out = emigm.linear(x, weight, bias)
    assert out.grad_fn.name() == "OneDNNLinearBackward"
    expected = F.linear(x, weight, bias)
    assert rel_err(out, expected) <= FP32_TOL
    grads = torch.autograd.grad(out, inputs, grad)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    for value, reference in zip(grads, expected_grads):
        assert rel_err(value, reference) <= FP32_TOL


def test_sampler_with_onednn_equals_the_mkl_kernels(monkeypatch):
    """The sampler's tokens with oneDNN's kernel (the default on CPU) and with torch's own
    (ONEDNN off, the official code's MKL) agree within fp32 rounding."""
    model = trained_looking(small_model()).eval()
    labels = torch.tensor([0, 3])
    samples = []
    for onednn in (True, False):
        monkeypatch.setattr(emigm, "ONEDNN", onednn)
        generator = torch.Generator().manual_seed(0)
        samples.append(sample.sample_tokens(model, labels, 4, 2.0, generator=generator))
    assert rel_err(samples[0], samples[1]) <= 1e-4


def test_packed_weights_serve_inference_only_and_are_gone_after(monkeypatch):
    """cli.packed_weights: inside, every emigm.Linear also has its weight in oneDNN's layout,
    which the calls without autograd take (the output as with the plain weight); calls with
    autograd take the plain weight (gradients as outside). After it, also after an error,
    no layer keeps one; after a nested one, the outer one's come back."""
    calls = spy_onednn(monkeypatch)
    model = small_model().eval()
    layers = [m for m in model.modules() if isinstance(m, emigm.Linear)]
    layer = model.diffloss.net.cond_embed
    x = torch.randn(6, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = layer(x)
    layer(x).sum().backward()
    expected_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    with cli.packed_weights(model):
        assert all(m.packed is not None and m.packed.is_mkldnn for m in layers)
        calls.clear()
        with torch.no_grad():
            assert rel_err(layer(x), expected) <= FP32_TOL
        assert calls == [((6, layer.in_features), True)]
        layer(x).sum().backward()
        assert calls == [((6, layer.in_features), True), ((6, layer.in_features), False)]
        assert rel_err(layer.weight.grad, expected_grad) <= FP32_TOL
    assert all(m.packed is None for m in layers)
    with pytest.raises(RuntimeError, match="inside"):
        with cli.packed_weights(model):
            raise RuntimeError("an error inside")
    assert all(m.packed is None for m in layers)
    # nested (sample_tokens inside a caller's packing): the outer copies come back
    with cli.packed_weights(model):
        outer = [m.packed for m in layers]
        with cli.packed_weights(model):
            assert all(m.packed is not p for m, p in zip(layers, outer))
        assert all(m.packed is p for m, p in zip(layers, outer))
    assert all(m.packed is None for m in layers)


def test_sampler_runs_on_packed_weights_with_the_same_tokens(monkeypatch):
    """sample_tokens runs inside cli.packed_weights: every linear layer's call there takes a
    packed weight but the last decoder block's q and kv (slices of qkv); its tokens agree
    with a run without packing within fp32 rounding (bit-equal on the CPUs measured)."""
    model = trained_looking(small_model()).eval()
    labels = torch.tensor([0, 3])
    samples = []
    runs = []
    for packing in (cli.packed_weights, contextlib.nullcontext):
        monkeypatch.setattr(sample, "packed_weights", packing)
        calls = spy_onednn(monkeypatch)
        generator = torch.Generator().manual_seed(0)
        samples.append(sample.sample_tokens(model, labels, 4, 2.0, generator=generator))
        runs.append([packed for _, packed in calls])
        monkeypatch.undo()
    assert rel_err(samples[0], samples[1]) <= FP32_TOL
    packed_run, plain_run = runs
    assert plain_run == [False] * len(packed_run)
    assert packed_run.count(False) == 2 * 4  # q and kv, once per step
    assert packed_run.count(True) > 10 * 4


# ---- the allocator
def test_keep_freed_memory_reuses_large_buffers_without_page_faults():
    """After cli.keep_freed_memory (on glibc), a 48 MB tensor reuses a freed 64 MB one's
    memory: filling it faults in almost no page (glibc's default: 12,288 fresh ones)."""
    code = ("import resource, torch, cli\n"
            "kept = cli.keep_freed_memory()\n"
            "torch.empty(2**24).fill_(1.0)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "torch.empty(3 * 2**22).fill_(1.0)\n"
            "print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    here = os.path.dirname(os.path.abspath(cli.__file__))
    result = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True,
                            text=True, check=True)
    kept, faults = result.stdout.split()
    assert kept == str(platform.libc_ver()[0] == "glibc")
    if kept == "True":
        assert int(faults) < 1000


def test_limit_onednn_cache_bounds_the_kernels_memory():
    """cli.limit_onednn_cache (every entry point): oneDNN keeps 32 kernels, not 1024. Linear
    layers at 120 row counts on a 1 MB weight: each kept kernel holds a reordered copy of it,
    so the default grows the process by ~100 MB more; a user's capacity wins."""
    code = ("import os, torch, cli, emigm\n"
            "cli.limit_onednn_cache()\n"
            "weight = torch.randn(1024, 256)\n"
            "for rows in range(2000, 2120):\n"
            "    emigm.linear(torch.randn(rows, 256), weight, None)\n"
            "resident_kb = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024\n"
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], resident_kb)\n")
    assert emigm.ONEDNN
    here = os.path.dirname(os.path.abspath(cli.__file__))
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    resident = {}
    for capacity in ({}, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}):
        result = subprocess.run([sys.executable, "-c", code], cwd=here, env={**env, **capacity},
                                capture_output=True, text=True, check=True)
        kernels, resident_kb = result.stdout.split()
        resident[kernels] = int(resident_kb)  # (ru_maxrss would count the parent's, from fork)
    assert set(resident) == {str(cli.ONEDNN_CACHED_KERNELS), "1024"}
    assert resident["1024"] - resident[str(cli.ONEDNN_CACHED_KERNELS)] > 30_000


# ---- torch.compile
def test_compiled_model_equals_eager_in_training_and_sampling():
    """cli.compile_model (train.py --compile) on a tiny model: the same loss and gradients
    as eager (one replayed mask, head steps and noise); with frozen weights (sample.py
    --compile) the same tokens from the same generator. Within fp32 tolerance."""
    torch.set_num_threads(1)
    eager = trained_looking(small_model(attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0))
    compiled = cli.compile_model(copy.deepcopy(eager))
    g = torch.Generator().manual_seed(6)
    tokens = torch.randn(2, 16, 4, generator=g)
    labels = torch.tensor([1, 3])
    mask = torch.rand(2, 16, generator=g).argsort(1) < 7
    head_t = torch.randint(0, 1000, (4 * 2 * 16,), generator=g)
    head_noise = torch.randn(4 * 2 * 16, 4, generator=g)
    losses = []
    for model in (eager, compiled):
        model.train().zero_grad()
        loss = model(tokens, labels, mask=mask, t=0.5, head_t=head_t, head_noise=head_noise)
        loss.backward()
        losses.append(loss)
    assert rel_err(losses[1], losses[0]) <= FP32_TOL
    for p_eager, p_compiled in zip(eager.parameters(), compiled.parameters()):
        assert rel_err(p_compiled.grad, p_eager.grad) <= 1e-4
    frozen = cli.compile_model(copy.deepcopy(eager).eval(), freezing=True)
    samples = []
    for model in (eager.eval(), frozen):
        generator = torch.Generator().manual_seed(0)
        samples.append(sample.sample_tokens(model, labels, 4, 2.0, generator=generator))
    assert rel_err(samples[1], samples[0]) <= 1e-4


def test_train_compile_flag_compiles_and_logs_the_first_step_apart(tmp_path, monkeypatch):
    """train.py --compile hands the model to cli.compile_model (recorded here, not compiled:
    that costs minutes) and logs the first step's time apart; with --log-every 1 the first
    log is step 2's (the compiled step is in no mean)."""
    import train
    from test_train import TINY
    compiled = []
    monkeypatch.setattr(cli, "compile_model", lambda model, **options: compiled.append(options))
    train.main([*TINY, "--results-dir", str(tmp_path), "--max-steps", "3", "--compile",
                "--sample-every", "0", "--ckpt-every", "0"])
    assert compiled == [{}]
    log = (tmp_path / "log.txt").read_text()
    assert "torch.compile: the first step took" in log
    assert "step 1 epoch" not in log and "step 2 epoch" in log and "step 3 epoch" in log


def test_sample_compile_flag_compiles_with_frozen_weights(tmp_path, monkeypatch):
    """sample.py --compile hands the loaded model to compile_model with inductor's freezing
    (recorded here, not compiled), then samples as without it."""
    from test_sample import TINY_CONFIG, save_tiny, seeded
    save_tiny(seeded(0, **TINY_CONFIG), tmp_path / "tiny.pt")
    compiled = []
    monkeypatch.setattr(sample, "compile_model", lambda model, **options: compiled.append(options))
    sample.main(["--ckpt", str(tmp_path / "tiny.pt"), "--nfe", "2", "--head-steps", "1",
                 "--cfg", "2", "--cfg-schedule", "constant", "--cfg-interval", "0.1", "0.9",
                 "--classes", "0", "--per-class", "1", "--grid", str(tmp_path / "grid.png"),
                 "--compile"])
    assert compiled == [{"freezing": True}]
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_sampler_flop_hooks_count_what_torch_counts(monkeypatch):
    """bench.count_flops (sample.py --bench) on an encoder and decoder pass that reads 5 of 16
    positions: the hooks' sum equals torch's FlopCounterMode on SDPA's math path, the last
    decoder block's q and kv matmuls (no qkv module call) and its 5 x 18 attention included."""
    import bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(emigm, "ONEDNN", False)  # FlopCounterMode counts aten's matmuls only
    model = small_model(depth=2).eval()
    hooks = bench.count_flops(model)
    g = torch.Generator().manual_seed(10)
    tokens = torch.randn(3, 16, 4, generator=g)
    mask = torch.rand(3, 16, generator=g).argsort(1) < 6
    read = torch.rand(3, 16, generator=g).argsort(1) < 5
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        encoded = model.forward_encoder(tokens, mask, model.class_emb(torch.tensor([0, 1, 2])))
        model.forward_decoder(encoded, mask, read)
    assert sum(hooks) == counter.get_total_flops() > 0


def test_onednn_linear_skips_the_gradients_no_one_needs(monkeypatch):
    """A frozen layer (an EMA copy, a fixed tokenizer) in a graph: OneDNNLinear's backward
    computes the input's gradient only, no weight gradient matmul (autograd's addmm skips it
    too); with x frozen instead, only the weight's and bias's."""
    matmuls = []
    mm = torch.Tensor.mm
    def spy(a, b):
        matmuls.append(tuple(b.shape))
        return mm(a, b)
    monkeypatch.setattr(torch.Tensor, "mm", spy)
    layer = emigm.Linear(64, 96).requires_grad_(False)
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).sum().backward()
    assert matmuls == [] and x.grad.shape == (5, 64)
    layer.requires_grad_(True)
    layer(x.detach()).sum().backward()
    assert matmuls == [(5, 64)] and layer.weight.grad.shape == (96, 64)
    assert torch.equal(layer.bias.grad, torch.full((96,), 5.0))


def test_training_flops_counts_on_torchs_kernels_and_restores_the_switch(monkeypatch):
    """bench.training_flops counts with emigm.ONEDNN off (torch counts no oneDNN op), the
    same count as F.linear's, and sets the switch back, also when a step fails."""
    import bench
    import train
    model = small_model()
    training = train.Training(model.train(), lr=1e-4, weight_decay=0.0)
    tokens = torch.randn(2, model.seq_len, model.token_channels)
    labels = torch.tensor([0, 1])
    flops = bench.training_flops(training, tokens, labels, 1, seed=0)
    assert flops > 0 and emigm.ONEDNN
    monkeypatch.setattr(emigm, "ONEDNN", False)
    assert bench.training_flops(training, tokens, labels, 1, seed=0) == flops
    monkeypatch.setattr(emigm, "ONEDNN", True)
    def failing_step(*args):
        assert not emigm.ONEDNN
        raise RuntimeError("a step failed")
    monkeypatch.setattr(training, "step", failing_step)
    with pytest.raises(RuntimeError, match="a step failed"):
        bench.training_flops(training, tokens, labels, 1, seed=0)
    assert emigm.ONEDNN


def test_timed_median_starts_each_round_from_one_rng_state():
    """bench.timed_median: the runs of a round draw the same random numbers (training steps:
    the same masks, so the same work for both checkouts); the rounds draw different ones."""
    import bench
    draws = {"ours": [], "theirs": []}
    def run(name):
        draws[name].append(float(torch.rand(())))
    medians = bench.timed_median({name: partial(run, name) for name in draws}, rounds=3)
    assert draws["ours"] == draws["theirs"]
    assert len(set(draws["ours"])) == 3
    assert set(medians) == {"ours", "theirs"}


def test_compare_times_another_checkout_beside_ours(tmp_path, capsys):
    """bench.py compare against a copy of this checkout (Tiny preset, 1 round): a row per
    work with both times; their modules are other objects, and ours are back afterwards."""
    import bench
    here = os.path.dirname(os.path.abspath(bench.__file__))
    for name in ("emigm.py", "sample.py", "head_samplers.py", "cli.py", "checkpoints.py"):
        shutil.copy(os.path.join(here, name), tmp_path / name)
    theirs = bench.load_checkout(str(tmp_path))
    assert theirs["emigm"] is not emigm and theirs["sample"].emigm is theirs["emigm"]
    assert sys.modules["emigm"] is emigm and sys.modules["sample"] is sample
    rows = bench.compare(str(tmp_path), rounds=1, sample_batches=(2,), size="Tiny")
    assert list(rows) == ["Tiny train step, batch 8", "Tiny sample K=16, batch 2"]
    assert all(row["theirs"] > 0 and row["ours"] > 0 for row in rows.values())
    assert "speed-up" in capsys.readouterr().out
    assert sys.modules["emigm"] is emigm
