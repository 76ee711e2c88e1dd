"""Tests of sample.py: equality with the official sampler's vectors (DPM-Solver++,
schedules, a teacher-forced sample_tokens trace), an analytic Gaussian for both head
samplers, exact small cases of the reveal counts, the CFG interval and guidance, NFE, the
paper's presets, and the command line (1 vs 2 processes give identical bytes; every bad
input is a one-line error that changes no file).
Run: python -m pytest -q test_sample.py

fp32 comparisons with the official vectors assert err <= MARGIN x spread, where spread is
the same computation's fp32-vs-fp64 difference on the same inputs, measured in the test:
the official fp32 result and ours each sit about one spread from the exact value, and
another CPU's summation order moves ours by about that much again."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom

import cli
import emigm
import head_samplers
import sample

HERE = Path(__file__).parent
REF = torch.load(HERE / "testdata" / "emigm_tiny_reference.pt", weights_only=True)
MARGIN = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors on a shared 2-core machine: one thread is ~3x faster than two
    fighting (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp64(model):
    """An fp64 copy; emigm computes the head's sinusoidal time features in fp32, the MLP
    after them runs in fp64."""
    model = copy.deepcopy(model).double()
    net = model.diffloss.net if hasattr(model, "diffloss") else model
    net.time_embed.mlp.register_forward_pre_hook(lambda module, args: (args[0].double(),))
    return model


def seeded(seed, **config):
    """A model initialised from `seed` without touching the global RNG of the other
    tests."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return emigm.EMIGM(**config).eval()


@pytest.fixture(scope="module")
def official():
    """The tiny official model of the reference file, loaded strictly."""
    model = emigm.EMIGM(16, 16, 64, 2, 4, 2, 64, num_classes=10, buffer_size=4).eval()
    model.load_state_dict(REF["state_dict"])
    return model


def test_dpm_solver_matches_official(official):
    sc = REF["schedules"]
    dpm = REF["dpm"]
    ns = head_samplers.noise_schedule()
    assert ns.total_N == sc["ns_total_N_after_lambda_clip"] == 996
    # computed in fp64 and cast: equal unless a value sat within 1e-16 of a float32
    # rounding boundary
    assert torch.equal(ns.t_array, sc["ns_t_array"][0])
    assert torch.equal(ns.log_alpha_array, sc["ns_log_alpha_array"][0])
    ns64 = copy.copy(ns)
    ns64.t_array = ns.t_array.double()
    ns64.log_alpha_array = ns.log_alpha_array.double()
    net = official.diffloss.net
    net64 = fp64(official).diffloss.net
    for steps in (8, 14):
        plan = head_samplers.dpm_plan(steps)
        assert [p.order for p in plan] == sc[f"dpm_steps{steps}/orders"]
        # the outer times and the net's time input (t - 1/N) * 1000
        # (measured: 0.0 here; spread 1.7e-5, 2.5e-5)
        outer = torch.stack([plan[0].s.t] + [p.t.t for p in plan])
        outer64 = ns64.time_steps(1.0, 1 / 996, len(plan))
        outer_ref = sc[f"dpm_steps{steps}/timesteps_outer"]
        assert rel(outer, outer_ref) <= MARGIN * rel(outer, outer64)
        t_in = (outer - 1 / 996) * 1000
        t_in64 = (outer64 - 1 / 996) * 1000
        t_in_ref = sc[f"dpm_steps{steps}/model_time_input_outer"]
        assert rel(t_in, t_in_ref) <= MARGIN * rel(t_in, t_in64)
        for cfg in (1.0, 3.0):
            calls = []
            hook = net.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
            out = head_samplers.dpm_solver_sample(
                net, dpm["noise"], dpm["z_cond"], dpm["z_uncond"], cfg, steps)
            hook.remove()
            out64 = head_samplers.dpm_solver_sample(
                net64, dpm["noise"].double(), dpm["z_cond"].double(),
                dpm["z_uncond"].double(), cfg, steps)
            # measured: 0.0 (bit-exact) here; spread 1.6e-7 to 2.8e-7
            assert rel(out, dpm[f"steps{steps}/cfg{cfg}"]) <= MARGIN * rel(out, out64)
            # one batched call per step
            assert len(calls) == dpm[f"steps{steps}/cfg{cfg}/model_calls"] == steps
            assert set(calls) == {40 * (2 if cfg != 1 else 1)}


def test_reveal_and_cfg_schedules_match_official():
    sc = REF["schedules"]
    for key in [k[:-len("/timesteps")] for k in sc if k.endswith("/timesteps")]:
        k = int(key.split("_cfg")[0][len("sampler_iter"):])
        interval = tuple(float(v) for v in key.split("[")[1].rstrip("]").split(","))
        ts, p = sample.reveal_schedule(k, "exp")
        assert torch.equal(ts, sc[key + "/timesteps"])
        # the same formula in fp64 on the same times
        # (measured: 0.0 here; spread 1.3e-7 to 5.1e-7)
        gamma64 = 1 - torch.exp(-5 * ts.double())
        p64 = 1 - gamma64[1:] / gamma64[:-1]
        p64[-1] = 1.0
        assert rel(p, sc[key + "/p_transfer_exp"]) <= MARGIN * rel(p, p64)
        assert torch.equal(sample.cfg_steps(k, 4.0, interval), sc[key + "/cfg_active"])
        assert sample.nfe(k, 4.0, interval) == (k, sc[key + "/nfe_multiplier"])
    assert sample.nfe(16, 1.0, (0.1, 0.3)) == (16, 1.0)  # cfg = 1: no unconditional pass


def test_presets_are_the_papers():
    """Table 2's "16 x 1.2" and "128 x 1.4", Table 3's "64 x 1.25"; settings() fills what
    is not given."""
    for (size, img_size), presets in sample.PRESETS.items():
        for k, preset in presets.items():
            assert set(preset) == {"head_steps", "cfg", "cfg_schedule", "cfg_interval"}
            if size == "Tiny":
                continue
            # 1.1875, 1.25, 1.35 to 1.41
            factor = sample.nfe(k, preset["cfg"], preset["cfg_interval"])[1]
            assert abs(factor - {16: 1.2, 64: 1.25, 128: 1.4}[k]) < 0.05
            assert preset["head_steps"] == (8 if k == 16 else 14)
    with torch.device("meta"):  # shapes only
        xs = emigm.create_emigm("XS")
        b = emigm.create_emigm("B")
    expected = dict(num_iter=128, head_sampler="dpm-solver", temperature=1.0,
                    mask_schedule=None, precision=None, head_steps=14, cfg=4.0,
                    cfg_schedule="constant", cfg_interval=(0.18, 0.6))
    assert sample.settings(xs, 128) == expected
    assert sample.settings(b, 128, cfg=2.0)["cfg_interval"] == (0.05, 0.4)
    assert sample.settings(b, 128, cfg=2.0)["cfg"] == 2.0
    # MAR's DDPM steps
    assert sample.settings(xs, 16, head_sampler="ddpm")["head_steps"] == 100
    with pytest.raises(ValueError, match="--nfe 33"):
        sample.settings(xs, 33)


def test_cfg_interval_bounds():
    """CFG iff t_min < s <= t_max, s the next time: an interval whose ends are two of the
    times themselves includes its upper end and excludes its lower end (the official
    test)."""
    s = sample.reveal_schedule(16)[0][1:]  # (K,) decreasing
    active = sample.cfg_steps(16, 3.0, (s[9].item(), s[5].item()))
    assert active.tolist() == [k in range(5, 9) for k in range(16)]
    assert not sample.cfg_steps(16, 1.0, (0.0, 1.0)).any()


def test_ddpm_guidance_is_uncond_plus_cfg_times_difference():
    """With eps linear in the condition, guiding eps (eps_u + cfg (eps_c - eps_u)) is the
    same as running unguided on the condition u + cfg (c - u): the same elementwise fp32
    operations on the same numbers, so equal bits."""
    def net(x, t, c):  # eps = the condition, the variance output 0
        return torch.cat([c, torch.zeros_like(x)], dim=1)

    cond, uncond = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    guided = head_samplers.ddpm_sample(net, noise, cond, uncond, 2.5, steps=5,
                                generator=torch.Generator().manual_seed(2))
    plain = head_samplers.ddpm_sample(net, noise, uncond + 2.5 * (cond - uncond), steps=5,
                               generator=torch.Generator().manual_seed(2))
    assert torch.equal(guided, plain)


def test_teacher_forced_trace_matches_official(official):
    """Replaying the official run's revealed positions and head noise gives its tokens, on
    sample_tokens' kernels (measured with oneDNN's, the weights packed: errors 2.7e-7, 3.6e-7,
    4.9e-7, 1.9e-7 per step against spreads 4.2e-7, 2.9e-7, 3.9e-7, 1.8e-7)."""
    tr = REF["sampler_trace"]
    B = tr["bsz"]
    steps = tr["steps"]
    interval = (tr["cfg_t_min"], tr["cfg_t_max"])
    guided = sample.cfg_steps(tr["num_iter"], tr["cfg"], interval).tolist()
    assert guided == [s["cfg_active"] for s in steps]
    official64 = fp64(official)
    tokens = torch.zeros(B, 16, 16)
    tokens64 = torch.zeros(B, 16, 16, dtype=torch.float64)
    mask = torch.ones(B, 16, dtype=torch.bool)
    errors = []
    spreads = []
    for k, s in enumerate(steps):
        mask_in = torch.cat([mask, mask] if guided[k] else [mask]).float()
        assert torch.equal(mask_in, s["mask_in"])
        # the same count in every row
        assert len(set(s["mask_to_pred"].sum(1).tolist())) == 1
        for model, x in ((official, tokens), (official64, tokens64)):
            # sample_tokens' kernels: the fp32 weights packed for oneDNN
            with cli.packed_weights(model):
                x = sample.predict_revealed(
                    model, x, mask, s["mask_to_pred"], model.class_emb(tr["labels"]),
                    cfg=s["cfg_iter"], guided=guided[k], head_steps=tr["dpm_steps"],
                    noise=s["noise"])
            if model is official:
                tokens = x
            else:
                tokens64 = x
        errors.append(rel(tokens[s["mask_to_pred"]], s["sampled"]))
        spreads.append(rel(tokens[s["mask_to_pred"]], tokens64[s["mask_to_pred"]]))
        mask = mask & ~s["mask_to_pred"]
    assert max(errors) <= MARGIN * max(spreads), (errors, spreads)
    final = tokens.transpose(1, 2).reshape(B, 16, 4, 4)
    assert rel(final, tr["final_tokens_unpatchified"]) <= MARGIN * rel(tokens, tokens64)


@pytest.mark.parametrize(
    "head,steps", [("dpm-solver", 8), ("dpm-solver", 14), ("ddpm", 50)])
def test_analytic_gaussian(head, steps):
    """Data ~ N(m, s^2) per channel has the closed-form eps predictor; the samples recover
    m and s within 1% (the std within 1.5% at 8 steps). DPM-Solver runs on normal
    quantiles (deterministic, so this measures the solver, not Monte Carlo noise).
    Measured std errors of the official 8-step solver: -7% at s = 0.5, -1.0% at 0.8, +1.2%
    at 1.0, +2.5% at 1.2; 14 steps: -1.3%, -0.1%, +0.4%, +0.5%; 9 to 11 steps (orders
    ending in 1 or 2) are off by 3-19%. The means sit ~0.6% s low: the lambda clip starts
    the solver at alpha_T = e^-5.1, not 0 (official). DDPM with the exact reverse variance
    is exact in distribution for any respacing (50 steps to save time); its Monte Carlo
    standard errors at n = 50k are 0.24% of |m| and 0.32% of s, so 1% is more than 3 of
    them."""
    m = torch.tensor([1.5, -2.0])
    s = torch.tensor([0.8, 1.0])  # latents are scaled to about unit variance
    ns = head_samplers.noise_schedule()
    ac = emigm.GaussianDiffusion().alphas_cumprod.float()

    def net(x, t, c):
        if head == "ddpm":
            # the net sees the original step; the exact reverse variance as the
            # learned one
            diffusion = head_samplers.respaced(steps)
            a2 = ac[t.long()][:, None]
            i = torch.searchsorted(diffusion.timesteps, t.long())
            coef1 = diffusion.posterior_mean_coef1.float()[i][:, None]
            lo = diffusion.posterior_log_variance_clipped.float()[i][:, None]
            hi = diffusion.betas.log().float()[i][:, None]
            var_x0 = s ** 2 * (1 - a2) / (a2 * s ** 2 + 1 - a2)
            v = 2 * ((coef1 ** 2 * var_x0 + lo.exp()).log() - lo) / (hi - lo) - 1
        else:
            # invert the official time input (t - 1/N) * 1000 to the solver's own
            # schedule
            a2 = (2 * ns.marginal_log_mean_coeff(t / 1000 + 1 / ns.total_N)).exp()[:, None]
            v = torch.zeros_like(x)
        eps = (1 - a2).sqrt() * (x - a2.sqrt() * m) / (a2 * s ** 2 + 1 - a2)
        # t is (1,), every row's: v broadcasts as the head's time embedding does
        return torch.cat([eps, v.expand_as(eps)], dim=1)

    gen = torch.Generator().manual_seed(0)
    n = 50_000 if head == "ddpm" else 20_000
    if head == "ddpm":
        noise = torch.randn(n, 2, generator=gen)
        x = head_samplers.ddpm_sample(net, noise, torch.zeros(n, 1), steps=steps,
                                      generator=gen)
    else:
        levels = (torch.arange(n) + 0.5) / n
        q = torch.distributions.Normal(0.0, 1.0).icdf(levels)[:, None].repeat(1, 2)
        x = head_samplers.dpm_solver_sample(net, q, torch.zeros(n, 1), steps=steps)
    assert ((x.mean(0) - m).abs() / m.abs()).max() < 0.01
    assert ((x.std(0) - s).abs() / s).max() < (0.015 if steps == 8 else 0.01)


def test_respacing_keeps_the_noise_levels_of_the_kept_steps():
    full = emigm.GaussianDiffusion()
    spaced = head_samplers.respaced(100)
    kept = spaced.timesteps
    assert spaced.num_steps == 100 and kept[0] == 0 and kept[-1] == 999
    assert torch.allclose(spaced.alphas_cumprod, full.alphas_cumprod[kept],
                          rtol=1e-9, atol=0)
    # 1000 of 1000 steps: the training schedule
    assert torch.equal(emigm.GaussianDiffusion(respace=1000).betas, full.betas)


def expected_reveals(L, shares):
    """The exact expected count revealed per step (dynamic programming over the number
    still masked, with the at-least-one rule)."""
    dist = np.eye(L + 1)[L]  # P(#masked = M)
    expected = []
    for pk in shares:
        new = np.zeros(L + 1)
        e = 0.0
        new[0] = dist[0]
        for M in range(1, L + 1):
            pmf = binom.pmf(np.arange(M + 1), M, pk)
            pmf[1] += pmf[0]  # nothing drawn -> one token
            pmf[0] = 0.0
            e += dist[M] * (pmf * np.arange(M + 1)).sum()
            new[M - np.arange(M + 1)] += dist[M] * pmf
        dist = new
        expected.append(e)
    return np.array(expected)


def test_reveal_counts_follow_the_schedule():
    """Every row reveals the same count, the counts sum to L, their means match the exact
    expectation within 4 standard errors, and no position is favoured (5 standard
    errors)."""
    L = 64
    K = 8
    trials = 1000
    p = sample.reveal_schedule(K, "exp")[1].tolist()
    expected = expected_reveals(L, p)
    counts = np.zeros((trials, K))
    step_of = np.zeros((trials, 3, L))
    gen = torch.Generator().manual_seed(0)
    for i in range(trials):
        mask = torch.ones(3, L, dtype=torch.bool)
        for k in range(K):
            if not mask[0].any():
                break
            reveal = sample.choose_reveal(mask, p[k], gen)
            n = reveal.sum(1)
            assert (n == n[0]).all() and n[0] >= 1 and not (reveal & ~mask).any()
            counts[i, k] = n[0]
            step_of[i][reveal.numpy()] = k
            mask &= ~reveal
    assert (counts.sum(1) == L).all()
    se = counts.std(0) / np.sqrt(trials) + 1e-9
    assert (np.abs(counts.mean(0) - expected) <= 4 * se).all(), (counts.mean(0), expected)
    per_pos = step_of.mean(0)  # (rows, L): mean step at which each position is revealed
    assert np.abs(per_pos - per_pos.mean()).max() <= 5 * step_of.std() / np.sqrt(trials)


TINY_CONFIG = dict(seq_len=49, token_channels=16, width=32, depth=1, num_heads=2,
                   head_depth=1, head_width=32, num_classes=10, buffer_size=4,
                   attn_dropout=0.0, proj_dropout=0.0)


@pytest.fixture(scope="module")
def tiny():
    return seeded(0, **TINY_CONFIG)


def record_passes(model, monkeypatch):
    """The batch size and masked count of every transformer pass of `model`."""
    passes = []
    encoder = model.forward_encoder

    def forward_encoder(x, m, c):
        passes.append((len(x), int(m[0].sum())))
        return encoder(x, m, c)

    monkeypatch.setattr(model, "forward_encoder", forward_encoder)
    return passes


@pytest.mark.parametrize(
    "cfg,interval", [(1.0, (0.0, 1.0)), (3.0, (0.1, 0.3)), (3.0, (0.0, 1.0))])
def test_cfg_branch_and_nfe(tiny, monkeypatch, cfg, interval):
    """The unconditional rows run exactly on the steps inside the interval (never with cfg
    = 1), a pass per step as NFE counts, and the head sees only the tokens revealed now
    (its batch: B x n_k, doubled on CFG steps)."""
    K = 16
    B = 3
    L = tiny.seq_len
    steps = 4
    passes = record_passes(tiny, monkeypatch)
    head_rows = []
    net = tiny.diffloss.net
    hook = net.register_forward_hook(lambda mod, i, o: head_rows.append(len(i[0])))
    gen = torch.Generator().manual_seed(1)
    out = sample.sample_tokens(tiny, torch.arange(B), K, cfg, "constant", interval,
                               head_steps=steps, generator=gen)
    hook.remove()
    guided = sample.cfg_steps(K, cfg, interval).tolist()
    batches = [b for b, _ in passes]
    assert len(passes) == K and batches == [2 * B if g else B for g in guided]
    assert sum(b for b, _ in passes) / (B * K) == sample.nfe(K, cfg, interval)[1]
    masked = [m for _, m in passes] + [0]
    revealed = [masked[k] - masked[k + 1] for k in range(K)]
    assert sum(revealed) == L and min(revealed) >= 1
    assert head_rows == [B * n * (2 if g else 1)
                         for n, g in zip(revealed, guided) for _ in range(steps)]
    assert out.shape == (B, L, tiny.token_channels) and (out != 0).all()


def test_mask_schedule_flag(monkeypatch):
    """mask_schedule plans the reveals with another gamma_t than the model's (Fig. 3a);
    None keeps the model's. At K = 2 the first step reveals max(Binomial(L, p), 1) tokens,
    p = 1 - gamma(0.5)/gamma(1): its mean over 40 runs must be within 4 standard errors of
    the exact value, and the schedules' means are >= 10 errors apart."""
    model = seeded(0, **dict(TINY_CONFIG, mask_schedule="cosine"))
    passes = record_passes(model, monkeypatch)
    L = model.seq_len
    runs = 40
    for schedule in (None, "linear", "cosine", "exp"):
        share = sample.reveal_schedule(2, schedule or "cosine")[1][0].item()
        first = []
        for seed in range(runs):
            passes.clear()
            gen = torch.Generator().manual_seed(seed)
            sample.sample_tokens(model, torch.arange(2), 2, 1.0, "constant", (0.0, 1.0),
                                 head_steps=1, generator=gen, mask_schedule=schedule)
            first.append(L - passes[1][1])
        expected = expected_reveals(L, [share])[0]
        se = np.sqrt(L * share * (1 - share) / runs)
        mean = np.mean(first)
        assert abs(mean - expected) <= 4 * se, (schedule, mean, expected)
    args = sample.build_parser().parse_args(["--mask-schedule", "linear"])
    chosen = sample.settings(model, 2, head_steps=1, cfg=1.0, cfg_schedule="constant",
                             cfg_interval=(0, 1), mask_schedule=args.mask_schedule)
    assert chosen["mask_schedule"] == "linear"


def save_tiny(model, path, **state):
    checkpoint = {"model": model.state_dict(), "ema": model.state_dict(),
                  "config": model.config}
    torch.save({**checkpoint, **state}, path)


def test_bulk_npz_identical_for_1_and_2_processes(tiny, tmp_path):
    save_tiny(tiny, tmp_path / "tiny.pt")
    flags = ["sample.py", "--ckpt", str(tmp_path / "tiny.pt"), "--num-images", "20",
             "--batch-size", "6", "--nfe", "6", "--head-steps", "3", "--cfg", "2",
             "--cfg-schedule", "constant", "--cfg-interval", "0.1", "0.8"]
    # the same threads per process in both runs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one_process = [sys.executable, *flags, "--out", str(tmp_path / "one")]
    two_processes = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node", "2", *flags, "--out", str(tmp_path / "two")]
    for cmd in (one_process, two_processes):
        subprocess.run(cmd, cwd=HERE, env=env, check=True, capture_output=True, timeout=300)
    one = (tmp_path / "one" / "samples.npz").read_bytes()
    two = (tmp_path / "two" / "samples.npz").read_bytes()
    assert one == two
    with np.load(tmp_path / "one" / "samples.npz") as f:
        assert f["arr_0"].shape == (20, 28, 28, 3) and f["arr_0"].dtype == np.uint8
        assert (np.bincount(f["arr_1"], minlength=10) == 2).all()


@pytest.fixture(scope="module")
def cli_files(tiny, tmp_path_factory):
    """A folder with what a user may already have written: checkpoints, a grid, a bulk
    run's first batch."""
    folder = tmp_path_factory.mktemp("cli")
    save_tiny(tiny, folder / "tiny.pt")
    wider = seeded(1, **dict(TINY_CONFIG, width=48))
    save_tiny(tiny, folder / "bad_size.pt", ema=wider.state_dict())
    (folder / "truncated.pt").write_bytes((folder / "tiny.pt").read_bytes()[:5000])
    (folder / "junk.pt").write_bytes(b"not a checkpoint")
    (folder / "a_file.txt").write_text("not a folder")
    (folder / "grid.png").write_bytes(b"an earlier grid")
    (folder / "out" / "batches").mkdir(parents=True)
    np.save(folder / "out" / "batches" / "000000.npy", np.zeros((2, 28, 28, 3), np.uint8))
    return folder


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in folder.rglob("*")}


BASE = ("--ckpt {d}/tiny.pt --nfe 2 --head-steps 1 --cfg 2 --cfg-schedule constant "
        "--cfg-interval 0.1 0.9 --classes 0 --per-class 1 --grid {d}/grid.png")
# (flags after BASE, or a whole command line when it starts with "!";
#  what the message must name)
BAD_INPUTS = [
    ("--batch-size 0", "--batch-size"), ("--batch-size x", "--batch-size"),
    ("--per-class 0", "--per-class"),
    ("--nfe 0", "--nfe"), ("--nfe -3", "--nfe"), ("--head-steps 0", "--head-steps"),
    ("--head-sampler ddpm --head-steps 1", "--head-steps"),
    ("--cfg -2", "--cfg"), ("--cfg 0.5", "--cfg"),
    ("--temperature -1", "--temperature"), ("--temperature 0", "--temperature"),
    ("--cfg-interval 0.5 0.2", "--cfg-interval"),
    ("--cfg-interval 0.3 0.3", "--cfg-interval"),
    ("--cfg-interval -0.1 0.5", "--cfg-interval"),
    ("--cfg-interval 0.1 1.5", "--cfg-interval"),
    ("--seed -1", "--seed"), ("--classes 10", "--classes"), ("--classes -1", "--classes"),
    ("--classes", "--classes"),
    ("--cfg-schedule nope", "--cfg-schedule"), ("--mask-schedule nope", "--mask-schedule"),
    ("--head-sampler nope", "--head-sampler"),
    ("--size B", "--size"), ("--size Tiny", "--size"), ("--img-size 512", "--img-size"),
    ("--tokenizer kl16", "--tokenizer"), ("--vae {d}/missing.ckpt", "--vae"),
    ("--grid {d}/missing/grid.png", "--grid"), ("--grid {d}/a_file.txt/grid.png", "--grid"),
    ("--grid {d}", "--grid"),
    ("--num-images 0 --out {d}/out", "--num-images"),
    ("--num-images 15 --out {d}/out", "--num-images"),
    ("--num-images 20", "--num-images"), ("--out {d}/out", "--out"),
    ("--num-images 20 --out {d}/a_file.txt", "--out"),
    ("--num-images 20 --out {d}/a_file.txt/out", "--out"),
    ("--num-images 20 --out {d}/out --fid-ref {d}/missing.npz", "--fid-ref"),
    ("--fid-ref fashion-mnist", "--fid-ref"),
    ("--num-images 20 --out {d}/out --fid-ref fashion-mnist --inception {d}/missing.pt",
     "--inception"),
    ("--ckpt {d}/junk.pt", "junk.pt"), ("--ckpt {d}/missing.pt", "missing.pt"),
    ("--ckpt {d}/truncated.pt", "truncated.pt"), ("--ckpt {d}/bad_size.pt", "--ckpt"),
    ("!--ckpt {d}/tiny.pt --nfe 33 --grid {d}/grid.png", "--nfe"), ("!--nfe 4", "--ckpt"),
    ("!--bench --bench-batches 0", "--bench-batches"),
    ("!--bench --bench-k 7", "--bench-k"),
]


@pytest.mark.parametrize("flags,needle", BAD_INPUTS)
def test_bad_inputs_are_one_line_errors(cli_files, capsys, flags, needle):
    """Exit status 2, no traceback, a last line that names the flag, and no file written
    or changed."""
    if flags.startswith("!"):
        argv = flags[1:].format(d=cli_files).split()
    else:
        argv = (BASE + " " + flags).format(d=cli_files).split()
    before = snapshot(cli_files)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: " in last and needle in last, err
    assert snapshot(cli_files) == before


def test_size_that_agrees_with_the_checkpoint_is_accepted(tmp_path):
    model = seeded(0, **emigm.TINY)
    save_tiny(model, tmp_path / "t.pt")
    loaded, _, _ = sample.load_model(tmp_path / "t.pt", size="Tiny")
    assert loaded.config == model.config
    with pytest.raises(ValueError, match="--size B"):
        sample.load_model(tmp_path / "t.pt", size="B")


def test_ema_by_default(tiny, tmp_path):
    other = seeded(1, **TINY_CONFIG)
    save_tiny(tiny, tmp_path / "t.pt", ema=other.state_dict())
    for ema, want in [(True, other), (False, tiny)]:
        model, _, _ = sample.load_model(tmp_path / "t.pt", ema=ema)
        assert torch.equal(model.z_proj.weight, want.z_proj.weight)


def test_seeds_give_different_samples_on_cpu(tiny, tmp_path):
    """--seed must change the noise on CPU, whose generator keeps only 32 bits of a seed:
    (seed << 32) + j did not."""
    assert len({cli.batch_seed(seed, j) for seed in range(4) for j in range(4)}) == 16
    assert all(0 <= cli.batch_seed(seed, 0) < 2**32 for seed in (0, 1, 2**40))
    save_tiny(tiny, tmp_path / "tiny.pt")
    grids = []
    for seed in (0, 1, 0):
        path = tmp_path / f"grid{len(grids)}.png"
        argv = ["--ckpt", str(tmp_path / "tiny.pt"), "--nfe", "4", "--head-steps", "2",
                "--cfg", "1", "--cfg-schedule", "constant", "--cfg-interval", "0", "1",
                "--classes", "0", "1", "--per-class", "2", "--seed", str(seed),
                "--grid", str(path)]
        sample.main(argv)
        grids.append(path.read_bytes())
    assert grids[0] != grids[1]
    assert grids[0] == grids[2]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_autocasts_the_transformer(tiny, monkeypatch, precision):
    """--precision: the transformer's matmuls run in bf16 / fp16 (seen by a hook), the
    head and the tokens stay fp32, and the samples stay close to fp32's (same seed:
    rounding only)."""
    dtypes = []
    fc1 = tiny.decoder_blocks[0].mlp.fc1
    hook = fc1.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    kwargs = dict(num_iter=4, cfg=2.0, cfg_interval=(0.0, 1.0), head_steps=4)
    labels = torch.arange(4) % tiny.num_classes
    try:
        seed = torch.Generator().manual_seed(0)
        fp32 = sample.sample_tokens(tiny, labels, generator=seed, **kwargs)
        seed = torch.Generator().manual_seed(0)
        low = sample.sample_tokens(tiny, labels, generator=seed, precision=precision,
                                   **kwargs)
    finally:
        hook.remove()
    expected = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert dtypes[0] == torch.float32 and set(dtypes[len(dtypes) // 2:]) == {expected}
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # the same draws: any difference is rounding, far below the tokens' spread
    assert (low - fp32).abs().mean() <= 0.1 * fp32.std()


def test_a_run_on_random_tokens_samples_as_pixels(tiny, tmp_path):
    """train.py's runs on random tokens store no tokenizer: sample.py decodes them by
    their token shape, as older checkpoints (49 tokens of 16: 28 x 28 pixels in 4 x 4
    patches)."""
    data = dict(tokenizer=None, img_size=None, patch=None, channels=None, class_names=None)
    save_tiny(tiny, tmp_path / "random.pt", data=data)
    _, _, found = sample.load_model(tmp_path / "random.pt")
    assert (found["tokenizer"], found["img_size"], found["channels"]) == ("pixel", 28, 1)
