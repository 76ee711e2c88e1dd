"""Sampling from eMIGM (You et al. 2025, arXiv 2503.07197): mask-prediction steps with a per-token diffusion head.

Sec. 3 / Fig. 2 of the paper, computing what the official code (ML-GSAI/eMIGM at de78623) computes:
  * K mask-prediction steps on t = linspace(1, 1e-5, K+1); step t -> s reveals a fraction 1 - gamma_s/gamma_t of the
    still-masked tokens, the same count in every row, and only those tokens go through the head;
  * the head sampler: DPM-Solver++ (singlestep, order 3, logSNR spacing; the official evaluation) or MAR's DDPM with
    learned variance over 100 respaced steps;
  * classifier-free guidance with the mask (Fig. 2e), only on steps whose next time s is in (t_min, t_max]
    ("time interval", Table 2's "16 x 1.2" and "128 x 1.4" NFE).
Deviations, same distribution: one vectorised draw gives every row a uniform subset of the same (Binomial) size
(official: a Python loop of CPU randperm calls over the rows); DDPM with CFG draws the noise of the conditional half
only. GPUs: the transformer in bf16 autocast (official: fp16), the head fp32. CPUs: fp32, equal to the official.

  python sample.py --ckpt PATH --size XS --nfe 16                       # grid PNG, one row per class
  torchrun --nproc_per_node 8 sample.py --ckpt PATH --size H --nfe 128 --num-images 50000 --out DIR   # samples.npz
  python sample.py --bench                                              # speed, random weights
"""
import argparse
import math
import os
import resource
import shutil
import time
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import emigm

SAMPLER_EPS = 1e-5  # the sampler's last time (training uses emigm.TRAIN_T_EPS)
LAMBDA_CLIP = -5.1  # DPM-Solver drops the trailing steps with logSNR/2 below this (4 of cosine-1000's)
GRID_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # ImageNet classes of the grids (DiT's sample.py)
METRIC_CACHE = Path.home() / ".cache" / "emigm-mini" / "small_metric.pt"  # fid.SmallDataMetric's trained classifier

# Paper presets (Table 2, the official eval scripts): K -> (head steps, cfg, cfg schedule, CFG interval (t_min, t_max]).
_P16, _P128 = (8, 4.0, "constant", (0.1, 0.3)), (14, 4.0, "constant", (0.18, 0.6))
PRESETS = {("XS", 256): {16: _P16, 128: _P128}, ("S", 256): {16: _P16, 128: _P128}, ("L", 256): {16: _P16, 128: _P128},
           ("B", 256): {16: _P16, 128: (14, 4.0, "constant", (0.05, 0.4))},
           ("H", 256): {16: (8, 4.0, "constant", (0.2, 0.4)), 128: (14, 4.0, "constant", (0.3, 0.7))},
           **{(size, 512): {16: (8, 4.0, "constant", (0.15, 0.35)), 64: (14, 4.0, "constant", (0.25, 0.5))}
              for size in ("XS", "S", "B", "L")},  # 512px: the eval scripts' intervals; 14 head steps at K=64 are ours
           ("Tiny", 28): {16: (8, 3.0, "constant", (0.0, 1.0))}}  # the CPU demo's (train.py --demo)
# cfg schedules: the scale is 1 + (cfg - 1) f(u), u = share of tokens revealed after the step (official options)
CFG_SCHEDULES = {"constant": None, "linear": lambda u: u, "power": lambda u: u ** 2, "cubic": lambda u: u ** 3,
                 "exp": lambda u: 1 - math.exp(-5 * u), "cosine": lambda u: math.cos(math.pi / 2 * (1 - u))}


# ---- The mask-prediction schedule, CFG interval and NFE -------------------------------------------------------------
def reveal_schedule(num_iter, schedule="exp"):
    """Times t_0 = 1 > ... > t_K = 1e-5 (K+1,) and, per step, the share of masked tokens to reveal p_k (K,)."""
    ts = torch.linspace(1, SAMPLER_EPS, num_iter + 1)  # float32, as the official code
    p = 1 - emigm.mask_ratio(ts[1:], schedule) / emigm.mask_ratio(ts[:-1], schedule)  # raw gamma, no eps remap
    p[-1] = 1.0  # the last step reveals everything
    return ts, p


def cfg_steps(num_iter, cfg, cfg_interval):
    """(K,) bool: the steps that run the unconditional branch, i.e. cfg != 1 and t_min < s <= t_max (s = next time)."""
    s = reveal_schedule(num_iter)[0][1:]
    return (s > cfg_interval[0]) & (s <= cfg_interval[1]) & (cfg != 1.0)


def nfe(num_iter, cfg, cfg_interval):
    """Transformer passes per image as the paper counts them: K x f, f = 1 + share of the steps with CFG."""
    return num_iter, 1 + cfg_steps(num_iter, cfg, cfg_interval).float().mean().item()


def draw(fn, shape, generator, device):
    """torch.rand or torch.randn from `generator` on its own device (the same numbers whatever the model's device)."""
    return fn(shape, generator=generator, device=generator.device if generator is not None else device).to(device)


def choose_reveal(mask, p, generator=None):
    """Which masked tokens to reveal now: n ~ Binomial(#masked, p) (at least 1) in every row, each row a uniform
    n-subset of its own masked positions. mask (B, L) bool (same count per row) -> reveal (B, L) bool."""
    if p >= 1:
        return mask.clone()
    n = max(int((draw(torch.rand, int(mask[0].sum()), generator, mask.device) < p).sum()), 1)  # row 0's (official)
    scores = draw(torch.rand, mask.shape, generator, mask.device).masked_fill(~mask, 2.0)
    return torch.zeros_like(mask).scatter_(1, scores.topk(n, dim=1, largest=False).indices, True)  # n per row


# ---- Head sampler 1: DPM-Solver++ (Lu et al. 2022), as the official code calls it (singlestep, order 3, logSNR) -----
def interp(x, xp, yp):
    """Piecewise-linear through (xp, yp), xp increasing, extrapolated with the end segments (DPM-Solver's)."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1) - 1
    return yp[i] + (x - xp[i]) * (yp[i + 1] - yp[i]) / (xp[i + 1] - xp[i])


class NoiseScheduleVP:
    """DPM-Solver's 'discrete' schedule from the head's training betas, log alpha piecewise linear in t_n = (n+1)/N."""

    def __init__(self, betas):  # betas: float64 (T,)
        log_alpha = 0.5 * torch.log(1 - betas).cumsum(0)
        lam = log_alpha - 0.5 * torch.log(1 - torch.exp(2 * log_alpha))
        self.total_N = int((lam >= LAMBDA_CLIP).sum())  # (!) official clip: 996 of 1000 for cosine
        self.log_alpha_array = log_alpha[:self.total_N].float()
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1)[1:]

    def log_alpha(self, t):
        return interp(t, self.t_array, self.log_alpha_array)

    def lam(self, t):  # lambda = log alpha - log sigma
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(1 - torch.exp(2 * log_alpha))

    def inverse_lambda(self, lam):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        return interp(log_alpha, self.log_alpha_array.flip(0), self.t_array.flip(0))

    def time_steps(self, t_T, t_0, n):  # n + 1 times uniform in lambda (skip_type 'logSNR')
        lam_T, lam_0 = self.lam(torch.tensor(t_T)).item(), self.lam(torch.tensor(t_0)).item()
        return self.inverse_lambda(torch.linspace(lam_T, lam_0, n + 1))


@lru_cache(maxsize=None)
def noise_schedule():
    return NoiseScheduleVP(emigm.GaussianDiffusion().betas)


@lru_cache(maxsize=None)
def dpm_plan(steps):
    """The solver's intervals for `steps` evaluations: a list of (order, r1, r2, h, times {s, s1, s2, t}), each time
    a (t, alpha, sigma) of 0-d float32 tensors. K = steps//3 + 1 intervals uniform in lambda, orders 3,...,3 + tail."""
    ns, K = noise_schedule(), steps // 3 + 1
    orders = [3] * (K - 2) + [2, 1] if steps % 3 == 0 else [3] * (K - 1) + [steps % 3]
    outer = ns.time_steps(1.0, 1.0 / ns.total_N, K)  # t_T = 1 down to t_0 = 1/N
    point = lambda t: (t, ns.log_alpha(t).exp(), torch.sqrt(1 - torch.exp(2 * ns.log_alpha(t))))
    plan = []
    for s, t, order in zip(outer[:-1], outer[1:], orders):
        lam = ns.lam(ns.time_steps(s.item(), t.item(), order))  # r1, r2 (order 2, 3) from a lambda-uniform split
        r = [(lam[i] - lam[0]) / (lam[-1] - lam[0]) for i in range(1, order)]
        lam_s, h = ns.lam(s), ns.lam(t) - ns.lam(s)
        inner = {f"s{i + 1}": point(ns.inverse_lambda(lam_s + ri * h)) for i, ri in enumerate(r)}
        plan.append((order, *(r + [None, None])[:2], h, dict(s=point(s), t=point(t), **inner)))
    return plan


@torch.no_grad()
def dpm_solver_sample(net, noise, cond, uncond=None, cfg=1.0, steps=8, temperature=None, generator=None):
    """DPM-Solver++ from t = 1 to 1/996 in `steps` calls of net(x (N, C), t (N,), c (N, D)) -> (N, >= C), eps first.
    noise (N, C), cond, uncond (N, D) -> x0 (N, C). (!) Deterministic: the official path ignores the temperature."""
    C, inv_N, guided = noise.shape[1], 1.0 / noise_schedule().total_N, uncond is not None and cfg != 1.0
    c_in = torch.cat([uncond, cond]) if guided else cond  # one batched call on [x; x]

    def data_pred(x, point):  # x0 = (x - sigma eps) / alpha with eps = eps_u + cfg (eps_c - eps_u)
        t, alpha, sigma = point
        t_in = ((t - inv_N) * 1000).to(x.device).expand(len(c_in))  # (!) official time input: not the index t*N - 1
        eps = net(torch.cat([x, x]) if guided else x, t_in, c_in)[:, :C]
        if guided:  # [uncond; cond] rows, DPM-Solver's order
            eps = eps[:len(x)] + cfg * (eps[len(x):] - eps[:len(x)])
        return (x - sigma * eps) / alpha

    x = noise
    for order, r1, r2, h, p in dpm_plan(steps):
        (_, _, sig_s), (_, a_t, sig_t) = p["s"], p["t"]
        phi_1, m_s = torch.expm1(-h), data_pred(x, p["s"])
        x_t = sig_t / sig_s * x - a_t * phi_1 * m_s  # DPM-Solver++1 (= DDIM); orders 2 and 3 add a correction
        if order > 1:
            _, a_s1, sig_s1 = p["s1"]
            m_s1 = data_pred(sig_s1 / sig_s * x - a_s1 * torch.expm1(-r1 * h) * m_s, p["s1"])
        if order == 2:  # DPM-Solver++(2S), Lu et al. 2022b Alg. 1
            x_t = x_t - (0.5 / r1) * (a_t * phi_1) * (m_s1 - m_s)
        if order == 3:  # the singlestep 3S update of DPM-Solver's code
            _, a_s2, sig_s2 = p["s2"]
            phi_12 = torch.expm1(-r2 * h)
            x_s2 = (sig_s2 / sig_s * x - a_s2 * phi_12 * m_s
                    + r2 / r1 * (a_s2 * (phi_12 / (r2 * h) + 1)) * (m_s1 - m_s))
            x_t = x_t + (1.0 / r2) * (a_t * (phi_1 / h + 1)) * (data_pred(x_s2, p["s2"]) - m_s)
        x = x_t
    return x


# ---- Head sampler 2: MAR's DDPM with learned variance over respaced steps (the official online evaluation) ----------
@lru_cache(maxsize=None)
def respaced(steps):
    """The 1000-step cosine diffusion respaced to `steps` steps (IDDPM's space_timesteps(1000, str(steps)))."""
    return emigm.GaussianDiffusion(respace=steps)


@torch.no_grad()
def ddpm_sample(net, noise, cond, uncond=None, cfg=1.0, steps=100, temperature=1.0, generator=None):
    """Ancestral sampling with the head's learned-range variance. Same arguments as dpm_solver_sample; the
    temperature scales the per-step noise only (MAR). With CFG only eps is guided, the variance is the cond one's."""
    diffusion = respaced(steps)
    C, x, guided = noise.shape[1], noise, uncond is not None and cfg != 1.0
    c_in = torch.cat([cond, uncond]) if guided else cond
    for i in reversed(range(steps)):
        t = torch.full((len(c_in),), int(diffusion.timesteps[i]), device=x.device)  # the net sees the original step
        out = net(torch.cat([x, x]) if guided else x, t, c_in)
        eps, var_out = out[:len(x), :C], out[:len(x), C:]
        if guided:
            eps = out[len(x):, :C] + cfg * (eps - out[len(x):, :C])
        x, logvar = diffusion.p_mean_logvar(eps, var_out, x, torch.full((len(x),), i, device=x.device))
        if i > 0:
            x = x + torch.exp(0.5 * logvar) * draw(torch.randn, x.shape, generator, x.device) * temperature
    return x


HEAD_SAMPLERS = {"dpm-solver": dpm_solver_sample, "ddpm": ddpm_sample}


# ---- The mask-prediction loop (Sec. 3, Fig. 2) ----------------------------------------------------------------------
@torch.no_grad()
def predict_revealed(model, tokens, mask, reveal, class_emb, cfg=1.0, guided=False, head_sampler="dpm-solver",
                     head_steps=8, temperature=1.0, generator=None, noise=None):
    """One step: the transformer on tokens (B, L, C) with mask (B, L) ([cond; uncond] rows when `guided`), then the head
    samples the tokens of reveal (B, L) from noise (n, C) (None: drawn). class_emb (B, D). -> new tokens (B, L, C)."""
    (B, _, C), (x, m, c) = tokens.shape, (tokens, mask, class_emb)
    if guided:  # CFG with mask (Fig. 2e): the same masked input with the fake class embedding
        x, m, c = torch.cat([x, x]), torch.cat([m, m]), torch.cat([c, model.fake_latent.expand(B, -1).to(c.dtype)])
    with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):  # the transformer in bf16 on GPUs, the head fp32
        z = model.forward_decoder(model.forward_encoder(x, m, c), m)  # (B or 2B, L, D)
    z_cond = z[:B][reveal].float()  # (n, D), row-major like the official z[mask_to_pred]; the head in fp32
    z_uncond = z[B:][reveal].float() if guided else None
    noise = draw(torch.randn, (len(z_cond), C), generator, z.device) if noise is None else noise.to(z.device)
    head = HEAD_SAMPLERS[head_sampler](model.diffloss.net, noise, z_cond, z_uncond, cfg, head_steps, temperature,
                                       generator)  # (n, C)
    return tokens.masked_scatter(reveal[..., None], head.to(tokens.dtype))  # tokens[reveal] = head, out of place


@torch.no_grad()
def sample_tokens(model, labels, num_iter=16, cfg=4.0, cfg_schedule="constant", cfg_interval=(0.1, 0.3),
                  head_sampler="dpm-solver", head_steps=8, temperature=1.0, generator=None, mask_schedule=None):
    """labels (B,) int64 -> tokens (B, L, C). K = num_iter steps; CFG (scale cfg, schedule cfg_schedule) only on the
    steps whose next time lies in cfg_interval = (t_min, t_max]; `generator` drives all randomness (its device)."""
    B, L, C, dev, f = len(labels), model.seq_len, model.token_channels, labels.device, CFG_SCHEDULES[cfg_schedule]
    schedule = model.mask_schedule if mask_schedule is None else mask_schedule  # Fig. 3a: another gamma_t at sampling
    p, guided = reveal_schedule(num_iter, schedule)[1], cfg_steps(num_iter, cfg, cfg_interval).tolist()
    tokens, mask = torch.zeros(B, L, C, device=dev), torch.ones(B, L, dtype=torch.bool, device=dev)  # True: masked
    class_emb = model.class_emb(labels)  # (B, D)
    for k in range(num_iter):
        if not mask[0].any():  # everything was revealed early (possible, rare): nothing left to do
            break
        reveal = choose_reveal(mask, p[k].item(), generator)  # (B, L); f of u = the share revealed after this step
        scale = cfg if f is None else 1 + (cfg - 1) * f(1 - (mask[0].sum().item() - reveal[0].sum().item()) / L)
        tokens = predict_revealed(model, tokens, mask, reveal, class_emb, scale, guided[k], head_sampler, head_steps,
                                  temperature, generator)
        mask = mask & ~reveal
    return tokens


# ---- Command-line value types (train.py uses them too): argparse turns a bad value into a one-line error, exit 2,
# before any work starts. 0 is a value like any other: only a flag left out (None) means "the default".
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


# ---- Run helpers shared with train.py (tokenizer.py, a leaf file, keeps an identical copy of setup_distributed) ----
@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device


def setup_distributed():
    """DiT's set-up, made optional: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain python is one process."""
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
    """The generator seed of batch `index` of a run seeded `seed`, the same on every rank and device.
    The CPU generator keeps only 32 bits of a seed, so (seed, index) is hashed into 32 bits (numpy's SeedSequence):
    (seed << 32) + index would keep only the index there."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def peak_memory_gb(device):
    """Peak memory of this process: allocated on the GPU, or the peak RSS on CPU (Linux reports it in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_peak_flops(device, clock=time.perf_counter, repeats=10):
    """The fp32 matmul peak of this process in FLOP per second of `clock`: the best of `repeats` 2048^3 products."""
    a = torch.randn(2048, 2048, device=device)
    best = 0.0
    for _ in range(repeats):
        start = clock()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * 2048**3 / (clock() - start))
    return best


# ---- Command line: a grid for eyes, an ADM-style .npz for FID (same bytes on any number of processes), a benchmark
def load_model(args, device):
    """-> (model in eval mode, training flags): ours rebuild from their 'config', official ones from --size."""
    ckpt = emigm.load_checkpoint(args.ckpt)  # one-line errors for missing, unreadable and non-eMIGM files
    if not (ckpt.get("config") or args.size):  # official checkpoints: the paper's architecture, named by --size
        raise ValueError(f"{args.ckpt} has no 'config' (an official checkpoint?): pass --size and --img-size")
    model = (emigm.EMIGM(**ckpt["config"]) if ckpt.get("config")
             else emigm.EMIGM_models[args.size](img_size=args.img_size))
    emigm.load_weights(model, ckpt, ema=not args.no_ema)
    extra = ckpt.get("args") or {}  # official: an argparse.Namespace
    return model.to(device).eval(), vars(extra) if isinstance(extra, argparse.Namespace) else extra


def settings(args, model):
    """The sampler's kwargs: the flags given, the rest from the preset of (--size or the checkpoint's arch, K)."""
    arch = lambda c: [c[k] for k in ("width", "depth", "num_heads", "head_depth", "head_width", "token_channels")]
    sizes = {("Tiny", 28): emigm.TINY, **{(name, img): dict(s, head_depth=d, head_width=w, **emigm.TOKENS[img])
                                          for name, s in emigm.SIZES.items() for img, (d, w) in s["head"].items()}}
    size = ((args.size, 28 if args.size == "Tiny" else args.img_size) if args.size else
            next((key for key, c in sizes.items() if arch(c) == arch(model.config)), "unknown"))
    head_steps = args.head_steps or (100 if args.head_sampler == "ddpm" else None)  # MAR's 100 DDPM steps
    preset, given = PRESETS.get(size, {}).get(args.nfe), (head_steps, args.cfg, args.cfg_schedule, args.cfg_interval)
    if preset is None and None in given:
        known = ", ".join(f"{s}@{img}: K in {sorted(k)}" for (s, img), k in PRESETS.items())
        raise ValueError(f"no paper preset for K={args.nfe} and size {size} ({known}); "
                         f"or pass all of --head-steps --cfg --cfg-schedule --cfg-interval")
    steps, cfg, sched, interval = [g if g is not None else p for g, p in zip(given, preset or given)]
    return dict(num_iter=args.nfe, cfg=cfg, cfg_schedule=sched, cfg_interval=tuple(interval),
                head_sampler=args.head_sampler, head_steps=steps, temperature=args.temperature)


def generate(model, tok, labels, kw, seed, device):
    """uint8 (B, H, W, 3) images (MAR's rounding, grey repeated as ADM wants), all randomness from `seed` alone."""
    tokens = sample_tokens(model, labels.to(device), generator=torch.Generator(device).manual_seed(seed), **kw)
    with torch.no_grad():
        x = ((tok.decode(tokens).float() + 1) / 2 * 255).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return x.expand(-1, -1, -1, 3).cpu().numpy() if x.shape[-1] == 1 else x.cpu().numpy()


def save_grid(model, tok, classes, per_class, sampler_kwargs, seed, batch_size, path, device):
    """A PNG with one row per class and per_class images in each; batch j seeded with batch_seed(seed, j) as in bulk."""
    from PIL import Image
    labels = torch.tensor(classes).repeat_interleave(per_class)
    start = time.perf_counter()
    batches = []
    for j, rows in enumerate(labels.split(batch_size)):
        batches.append(generate(model, tok, rows, sampler_kwargs, batch_seed(seed, j), device))
    images = np.concatenate(batches)  # (N, H, W, 3) uint8
    rows = images.reshape(len(classes), per_class, *images.shape[1:]).swapaxes(1, 2)  # (rows, H, per_class, W, 3)
    Image.fromarray(rows.reshape(rows.shape[0] * rows.shape[1], -1, 3)).save(path)
    print(f"wrote {path}; {(time.perf_counter() - start) / len(labels):.3f} s/image (first batch included)")


def grid(model, tok, kw, args, device):
    """One row per class (--classes, default DiT's 8 or all if <= 16), --per-class images in each."""
    classes = args.classes or (list(range(model.num_classes)) if model.num_classes <= 16 else GRID_CLASSES)
    save_grid(model, tok, classes, args.per_class, kw, args.seed, args.batch_size, args.grid, device)


def bulk(model, tok, kw, args, rank, world, device):
    """OUT/samples.npz: arr_0 N images, arr_1 labels i % num_classes. Global batch j, seeded from (seed, j), goes to
    rank j % world and to its own file: the bytes do not depend on the number of processes; restarts skip done files."""
    from tqdm import tqdm
    n, nc, parts = args.num_images, model.num_classes, Path(args.out) / "batches"
    if n % nc:
        raise ValueError(f"--num-images {n} is not a multiple of the {nc} classes")
    inception = None
    if args.fid_ref and args.fid_ref != "fashion-mnist" and rank == 0:  # fail now, not after sampling 50k images
        if not os.path.exists(args.fid_ref):
            raise FileNotFoundError(f"--fid-ref {args.fid_ref} does not exist")
        inception = __import__("fid").load_inception(args.inception, device)
    labels = torch.arange(n) % nc
    batches, path = labels.split(args.batch_size), lambda j: parts / f"{j:06d}.npy"
    parts.mkdir(parents=True, exist_ok=True)
    times = []  # (seconds, images) of each batch sampled here
    for j in tqdm(range(rank, len(batches), world), disable=rank != 0, desc="sampling"):
        if not path(j).exists():
            start = time.perf_counter()
            np.save(parts / f"tmp{rank}.npy", generate(model, tok, batches[j], kw, batch_seed(args.seed, j), device))
            os.replace(parts / f"tmp{rank}.npy", path(j))  # complete files only
            times.append((time.perf_counter() - start, len(batches[j])))
    if rank == 0 and len(times) > 1:  # seconds / images, after the warm-up batch
        print(f"{np.divide(*np.sum(times[1:], axis=0)):.3f} s/image on rank 0 after a warm-up batch")
    if world > 1:
        dist.barrier()
    if rank == 0:
        arr = np.concatenate([np.load(path(j)) for j in range(len(batches))])
        np.savez(parts.parent / "samples.npz", arr_0=arr, arr_1=labels.numpy())
        shutil.rmtree(parts)
        print(f"wrote {parts.parent / 'samples.npz'}: {arr.shape} uint8, {n // nc} per class")
        if args.fid_ref == "fashion-mnist":  # our offline metric for 28x28 data, not comparable with Inception FID
            import fid, tokenizer
            metric = fid.SmallDataMetric(*tokenizer.load_fashion_mnist("train"), str(METRIC_CACHE))
            print(fid.SmallDataMetric.label, metric.evaluate(arr[..., 0], labels.numpy()))
        elif args.fid_ref:
            print(__import__("fid").compute_metrics(arr, args.fid_ref, model=inception))


def bench(args):
    """Random-weight XS at 256px: s/image at K=16 and 128 per batch size and the share of the fp32 matmul peak, then
    the CFG-interval and linear-in-K checks, in CPU time (other jobs on a shared machine disturb it less than wall)."""
    torch.manual_seed(0)
    model, flops, xs = emigm.EMIGM_models["XS"]().eval(), [], PRESETS["XS", 256]
    for m in model.modules():  # forward hooks: cheap, and they count exactly what runs
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda m, i, o: flops.append(2 * i[0].numel() * m.out_features))
        elif isinstance(m, emigm.Attention):  # q k^T and attn v
            m.register_forward_hook(lambda m, i, o: flops.append(4 * o.shape[0] * o.shape[1] ** 2 * o.shape[2]))
    peak = matmul_peak_flops(torch.device("cpu"), clock=time.process_time, repeats=5)  # FLOP per CPU-second
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP per CPU-second ({torch.get_num_threads()} threads)")
    def run(k, batch, interval):  # -> (CPU seconds, FLOPs)
        flops.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        sample_tokens(model, torch.arange(batch), k, 4.0, "constant", interval, "dpm-solver",
                      xs[16 if k <= 16 else 128][0], generator=torch.Generator().manual_seed(0))
        cpu, wall, fl = time.process_time() - cpu, time.perf_counter() - wall, sum(flops)
        print(f"K={k:3d} NFE = {k} x {nfe(k, 4.0, interval)[1]:.4f} (interval {interval}), batch {batch:2d}: "
              f"{wall / batch:.3f} s/image wall, {cpu / batch:.3f} CPU-s/image, {fl / 1e12:.3f} TFLOP, "
              f"{fl / cpu / peak:.0%} of the matmul peak", flush=True)
        return cpu, fl
    run(2, 1, (0.1, 0.3))  # warm-up
    res, b = {(k, b): run(k, b, xs[k][3]) for k in args.bench_k for b in args.bench_batches}, args.bench_batches[0]
    if (16, b) in res:  # both checks against K=16 at the first batch size
        (t16, f16), (t_all, f_all), f16_nfe = res[16, b], run(16, b, (0.0, 1.0)), nfe(16, 4.0, xs[16][3])[1]
        print(f"CFG interval (K=16, batch {b}): CPU time {xs[16][3]} / CFG on every step = {t16 / t_all:.3f}; "
              f"NFE predicts {f16_nfe / 2:.3f}, FLOPs {f16 / f_all:.3f}")
        if (128, b) in res:
            print(f"linear in K (batch {b}): CPU time K=128 / K=16 = {res[128, b][0] / t16:.2f}; NFE predicts "
                  f"{128 * nfe(128, 4.0, xs[128][3])[1] / (16 * f16_nfe):.2f}, FLOPs {res[128, b][1] / f16:.2f}")


def run(args):
    import tokenizer
    if not args.ckpt or (args.num_images is None) != (args.out is None):
        raise ValueError("pass --ckpt, and --num-images with --out for bulk mode (or --bench)")
    ddp = setup_distributed()
    rank, world, device = ddp.rank, ddp.world_size, ddp.device
    model, ckpt_args = load_model(args, device)
    kw = settings(args, model)
    kind = args.tokenizer or ("pixel" if model.seq_len != 256 else "dcae" if model.token_channels == 32 else "kl16")
    tok = (tokenizer.load_tokenizer(kind, patch=28 // math.isqrt(model.seq_len)) if kind == "pixel"  # 28x28 images
           else tokenizer.load_tokenizer(kind, args.vae or ckpt_args.get("vae"))).to(device).eval()
    if tok.channels != model.token_channels:
        raise ValueError(f"tokenizer {kind!r} gives {tok.channels} channels, the model takes {model.token_channels}")
    if rank == 0:
        k, f = nfe(kw["num_iter"], kw["cfg"], kw["cfg_interval"])
        print(f"NFE = {k} x {f:.4f} (~{k} x {f:.1f}); {kw}")
    bulk(model, tok, kw, args, rank, world, device) if args.out else grid(model, tok, kw, args, device)
    if rank == 0:
        where = "allocated on the GPU" if device.type == "cuda" else "max RSS"
        print(f"peak memory {peak_memory_gb(device):.2f} GiB ({where})")
    if world > 1:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description="eMIGM sampling: a grid PNG, an ADM .npz for FID (--num-images), --bench")
    p.add_argument("--ckpt", help="our checkpoint (has 'config') or an official one (then pass --size, --img-size)")
    p.add_argument("--size", choices=list(emigm.EMIGM_models), help="default: from the checkpoint's config")
    p.add_argument("--img-size", type=int, default=256, choices=[256, 512])
    p.add_argument("--nfe", type=int, default=16, help="K, the mask-prediction steps (presets: 16, 128; 512px: 64)")
    p.add_argument("--cfg", type=float, help="preset: 4.0")
    p.add_argument("--cfg-schedule", choices=list(CFG_SCHEDULES), help="preset: constant")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("T_MIN", "T_MAX"), help="CFG iff T_MIN < s <= T_MAX")
    p.add_argument("--head-sampler", default="dpm-solver", choices=list(HEAD_SAMPLERS))
    p.add_argument("--head-steps", type=int, help="presets: 8 for K=16, 14 for K=128 (MAR's ddpm: 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="ddpm only (the official DPM-Solver ignores it)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--tokenizer", choices=["kl16", "dcae", "pixel"], help="default: from the token shape")
    p.add_argument("--vae", help="kl16.ckpt or the DC-AE diffusers directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="per process; the images depend on it")
    p.add_argument("--classes", type=int, nargs="*", help="grid rows (default: DiT's 8, or all if <= 16)")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--grid", default="samples.png")
    p.add_argument("--num-images", type=int, help="bulk mode: OUT/samples.npz with this many images")
    p.add_argument("--out", help="bulk mode directory")
    p.add_argument("--fid-ref", help="reference stats/.npz/folder for fid.py, or 'fashion-mnist' (small-data metric)")
    p.add_argument("--inception", help="Inception weights for --fid-ref")
    p.add_argument("--bench", action="store_true", help="time the sampler on random XS weights")
    p.add_argument("--bench-k", type=int, nargs="+", default=[16, 128], choices=[16, 128])
    p.add_argument("--bench-batches", type=int, nargs="+", default=[1, 16, 64])
    args = p.parse_args(argv)
    try:
        bench(args) if args.bench else run(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"error: {' '.join(str(e.args[0] if e.args else e).split())}") from None


if __name__ == "__main__":
    main()
