"""Sampling from eMIGM (You et al. 2025, arXiv 2503.07197): masked tokens, per-token diffusion head.

Sec. 3 and Fig. 3 of the paper as the official code (ML-GSAI/eMIGM at de78623) computes them: K
steps on t = linspace(1, 1e-5, K + 1); step t -> s reveals 1 - gamma_s / gamma_t of the masked
tokens (the same count in every row); the head samples them (DPM-Solver++ as the official
evaluation, or MAR's DDPM); CFG (Fig. 2e) only when s is in (t_min, t_max] (Fig. 3c): NFE = K x f.
Deviations, same distribution: one vectorised draw picks every row's tokens (official: a randperm
loop); DDPM with CFG draws the noise of the conditional half only. GPUs: the transformer in bf16
(official: fp16), the head in fp32. CPUs: fp32, as the official code.

  python sample.py --ckpt PATH --nfe 16      # grid PNG, one row per class
  torchrun --nproc_per_node 8 sample.py --ckpt PATH --nfe 128 --num-images 50000 --out DIR
  python sample.py --bench                   # speed, random weights
"""
import argparse
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import emigm

SAMPLER_EPS = 1e-5  # the sampler's last time (training uses emigm.TRAIN_T_EPS)
LAMBDA_CLIP = -5.1  # DPM-Solver drops the last steps with logSNR / 2 below this (4 of 1000)
GRID_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # ImageNet classes (DiT's sample.py)
METRIC_CACHE = Path.home() / ".cache" / "emigm-mini" / "small_metric.pt"  # the small-data metric
CFG_SCHEDULES = ("constant", "linear", "power", "cubic", "exp", "cosine")  # see cfg_scale


# ==== 1. The reveal schedule (Sec. 3; the mask schedule of Fig. 3a) ===========================
def reveal_schedule(num_iter, schedule="exp"):
    """Times t_0 = 1 > ... > t_K = 1e-5 (K + 1,) and the share of the masked tokens each step
    reveals (K,): from t to s, gamma_s / gamma_t of them stay masked (the raw gamma)."""
    times = torch.linspace(1, SAMPLER_EPS, num_iter + 1)  # float32, as the official code
    share = 1 - emigm.mask_ratio(times[1:], schedule) / emigm.mask_ratio(times[:-1], schedule)
    share[-1] = 1.0  # the last step reveals everything
    return times, share


def draw(fn, shape, generator, device):
    """torch.rand or torch.randn from `generator` on its own device (the same on any device)."""
    if generator is None:
        return fn(shape, device=device)
    return fn(shape, generator=generator, device=generator.device).to(device)


def choose_reveal(mask, share, generator=None):
    """n ~ Binomial(#masked, share), at least 1, the same in every row; each row reveals a
    uniform n-subset of its masked positions. mask (B, L) bool, n per row -> (B, L) bool."""
    if share >= 1:
        return mask.clone()
    coins = draw(torch.rand, int(mask[0].sum()), generator, mask.device)  # row 0's (official)
    n = max(int((coins < share).sum()), 1)
    # the n masked positions of lowest score; unmasked ones score 2, above every draw
    scores = draw(torch.rand, mask.shape, generator, mask.device).masked_fill(~mask, 2.0)
    chosen = scores.topk(n, dim=1, largest=False).indices  # (B, n)
    return torch.zeros_like(mask).scatter_(1, chosen, True)


# ==== 2. Classifier-free guidance on a time interval, and NFE (Fig. 3c, Table 2) ==============
def cfg_steps(num_iter, cfg, cfg_interval):
    """(K,) bool: the steps with the unconditional branch: cfg != 1 and t_min < s <= t_max."""
    t_min, t_max = cfg_interval
    s = reveal_schedule(num_iter)[0][1:]  # (K,)
    return (s > t_min) & (s <= t_max) & (cfg != 1.0)


def cfg_scale(cfg, cfg_schedule, u):
    """A step's guidance scale 1 + (cfg - 1) f(u), u = the share of tokens revealed after it."""
    if cfg_schedule == "linear":
        return 1 + (cfg - 1) * u
    if cfg_schedule == "power":
        return 1 + (cfg - 1) * u ** 2
    if cfg_schedule == "cubic":
        return 1 + (cfg - 1) * u ** 3
    if cfg_schedule == "exp":
        return 1 + (cfg - 1) * (1 - math.exp(-5 * u))
    if cfg_schedule == "cosine":
        return 1 + (cfg - 1) * math.cos(math.pi / 2 * (1 - u))
    return cfg  # constant


def nfe(num_iter, cfg, cfg_interval):
    """Transformer passes per image, NFE = K x f, as (K, f): f = 1 + the share of CFG steps."""
    return num_iter, 1 + cfg_steps(num_iter, cfg, cfg_interval).float().mean().item()


# ==== 3a. The head sampler DPM-Solver++ (Lu et al. 2022) as the official code calls it ========
def interp(x, xp, yp):
    """Piecewise-linear through (xp, yp), xp increasing, extrapolated (DPM-Solver's)."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1) - 1
    return yp[i] + (x - xp[i]) * (yp[i + 1] - yp[i]) / (xp[i + 1] - xp[i])


@dataclass
class SolverTime:
    """A time t of the solver, alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t) (0-d fp32)."""
    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    lam: torch.Tensor


class NoiseScheduleVP:
    """DPM-Solver's 'discrete' schedule: log alpha piecewise linear in t_n = (n + 1) / N."""

    def __init__(self, betas):  # betas: float64 (T,)
        log_alpha = 0.5 * torch.log(1 - betas).cumsum(0)
        lam = log_alpha - 0.5 * torch.log(1 - torch.exp(2 * log_alpha))
        self.total_N = int((lam >= LAMBDA_CLIP).sum())  # (!) the official clip: 996 for cosine
        self.log_alpha_array = log_alpha[:self.total_N].float()
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1)[1:]

    def marginal_log_mean_coeff(self, t):  # log alpha_t
        return interp(t, self.t_array, self.log_alpha_array)

    def marginal_lambda(self, t):
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * torch.log(1 - torch.exp(2 * log_alpha))

    def inverse_lambda(self, lam):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        return interp(log_alpha, self.log_alpha_array.flip(0), self.t_array.flip(0))

    def at(self, t):
        log_alpha = self.marginal_log_mean_coeff(t)
        sigma = torch.sqrt(1 - torch.exp(2 * log_alpha))
        return SolverTime(t, log_alpha.exp(), sigma, self.marginal_lambda(t))

    def time_steps(self, t_T, t_0, n):  # n + 1 times uniform in lambda (skip_type 'logSNR')
        lambda_T = self.marginal_lambda(torch.tensor(t_T)).item()
        lambda_0 = self.marginal_lambda(torch.tensor(t_0)).item()
        return self.inverse_lambda(torch.linspace(lambda_T, lambda_0, n + 1))


@lru_cache(maxsize=None)
def noise_schedule():
    return NoiseScheduleVP(emigm.GaussianDiffusion().betas)


@dataclass
class SolverStep:
    """An interval s -> t, h = lambda_t - lambda_s; s1 at lambda_s + r1 h (orders 2, 3), s2 at
    lambda_s + r2 h (order 3)."""
    order: int
    s: SolverTime
    t: SolverTime
    h: torch.Tensor
    r1: torch.Tensor = None
    s1: SolverTime = None
    r2: torch.Tensor = None
    s2: SolverTime = None


@lru_cache(maxsize=None)
def dpm_plan(steps):
    """The SolverSteps of `steps` net calls: steps // 3 + 1 intervals uniform in lambda from 1
    to 1/N, of order 3 but a tail of order 2 and/or 1 (singlestep, order 3)."""
    ns = noise_schedule()
    num_intervals = steps // 3 + 1
    if steps % 3 == 0:
        orders = [3] * (num_intervals - 2) + [2, 1]
    else:
        orders = [3] * (num_intervals - 1) + [steps % 3]
    outer = ns.time_steps(1.0, 1.0 / ns.total_N, num_intervals)
    plan = []
    for s, t, order in zip(outer[:-1], outer[1:], orders):
        h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
        step = SolverStep(order, ns.at(s), ns.at(t), h)
        # r1, r2 from a lambda-uniform split of [s, t], mapped t -> lambda -> t -> lambda
        lambdas = ns.marginal_lambda(ns.time_steps(s.item(), t.item(), order))  # (order + 1,)
        r = (lambdas - lambdas[0]) / (lambdas[-1] - lambdas[0])
        if order >= 2:
            step.r1 = r[1]
            step.s1 = ns.at(ns.inverse_lambda(step.s.lam + r[1] * h))
        if order == 3:
            step.r2 = r[2]
            step.s2 = ns.at(ns.inverse_lambda(step.s.lam + r[2] * h))
        plan.append(step)
    return plan


@torch.no_grad()
def dpm_solver_sample(net, noise, cond, uncond=None, cfg=1.0, steps=8, temperature=None,
                      generator=None):
    """DPM-Solver++ from t = 1 to 1/996 in `steps` calls of net(x (N, C), t (N,), c (N, D)),
    eps in its first C outputs. noise (N, C), cond, uncond (N, D) -> x0 (N, C). (!) The official
    path ignores the temperature: deterministic."""
    C = noise.shape[1]
    inv_N = 1.0 / noise_schedule().total_N
    guided = uncond is not None and cfg != 1.0
    c_in = torch.cat([uncond, cond]) if guided else cond  # one call on [x; x], DPM-Solver's

    def data_prediction(x, time):
        """x0 = (x - sigma_t eps) / alpha_t with eps = eps_u + cfg (eps_c - eps_u) under CFG."""
        # (!) the official time input (t - 1/N) * 1000, not the index t N - 1
        t_in = ((time.t - inv_N) * 1000).to(x.device).expand(len(c_in))
        eps = net(torch.cat([x, x]) if guided else x, t_in, c_in)[:, :C]  # (N or 2N, C)
        if guided:
            eps = eps[:len(x)] + cfg * (eps[len(x):] - eps[:len(x)])
        return (x - time.sigma * eps) / time.alpha

    x = noise
    for p in dpm_plan(steps):
        # DPM-Solver++(1) from s to t (DDIM); orders 2 and 3 add a correction from s1 (and s2)
        m_s = data_prediction(x, p.s)
        phi_1 = torch.expm1(-p.h)
        x_t = p.t.sigma / p.s.sigma * x - p.t.alpha * phi_1 * m_s
        if p.order > 1:
            x_s1 = p.s1.sigma / p.s.sigma * x - p.s1.alpha * torch.expm1(-p.r1 * p.h) * m_s
            m_s1 = data_prediction(x_s1, p.s1)
        if p.order == 2:  # DPM-Solver++(2S), Lu et al. 2022b, Alg. 1
            x_t = x_t - (0.5 / p.r1) * (p.t.alpha * phi_1) * (m_s1 - m_s)
        if p.order == 3:  # the singlestep third-order update of DPM-Solver's code
            phi_12 = torch.expm1(-p.r2 * p.h)
            x_s2 = (p.s2.sigma / p.s.sigma * x - p.s2.alpha * phi_12 * m_s
                    + p.r2 / p.r1 * (p.s2.alpha * (phi_12 / (p.r2 * p.h) + 1)) * (m_s1 - m_s))
            m_s2 = data_prediction(x_s2, p.s2)
            x_t = x_t + (1.0 / p.r2) * (p.t.alpha * (phi_1 / p.h + 1)) * (m_s2 - m_s)
        x = x_t
    return x


# ==== 3b. The head sampler DDPM with learned variance (MAR; the official online evaluation) ===
@lru_cache(maxsize=None)
def respaced(steps):
    """The 1000-step cosine diffusion respaced to `steps` (IDDPM's space_timesteps)."""
    return emigm.GaussianDiffusion(respace=steps)


@torch.no_grad()
def ddpm_sample(net, noise, cond, uncond=None, cfg=1.0, steps=100, temperature=1.0,
                generator=None):
    """Ancestral sampling, arguments as dpm_solver_sample; the temperature scales the per-step
    noise (MAR). CFG guides eps only, eps_u + cfg (eps_c - eps_u); the variance is the cond's."""
    diffusion = respaced(steps)
    C = noise.shape[1]
    guided = uncond is not None and cfg != 1.0
    c_in = torch.cat([cond, uncond]) if guided else cond  # one call on [x; x], MAR's order
    x = noise
    for i in reversed(range(steps)):
        # the net sees the original step of respaced step i
        t = torch.full((len(c_in),), int(diffusion.timesteps[i]), device=x.device)
        out = net(torch.cat([x, x]) if guided else x, t, c_in)  # (N or 2N, 2C): [eps | var]
        eps = out[:len(x), :C]
        if guided:
            eps = out[len(x):, :C] + cfg * (eps - out[len(x):, :C])
        index = torch.full((len(x),), i, device=x.device)
        x, logvar = diffusion.p_mean_logvar(eps, out[:len(x), C:], x, index)
        if i > 0:
            noise = draw(torch.randn, x.shape, generator, x.device)
            x = x + torch.exp(0.5 * logvar) * noise * temperature
    return x


HEAD_SAMPLERS = {"dpm-solver": dpm_solver_sample, "ddpm": ddpm_sample}


# ==== 4. The mask-prediction loop (Sec. 3) ====================================================
@torch.no_grad()
def predict_revealed(model, tokens, mask, reveal, class_emb, *, cfg=1.0, guided=False,
                     head_sampler="dpm-solver", head_steps=8, temperature=1.0, generator=None,
                     noise=None):
    """One step: the transformer on tokens (B, L, C), mask (B, L) and class_emb (B, D), then the
    head samples the tokens of reveal (B, L) from noise (n, C) (None: drawn) in the tokens'
    precision. `guided`: CFG with [cond; uncond] rows. -> the new tokens (B, L, C)."""
    B, L, C = tokens.shape
    x = tokens
    m = mask
    c = class_emb
    if guided:  # CFG with mask (Fig. 2e): the same masked input with the fake class embedding
        x = torch.cat([tokens, tokens])
        m = torch.cat([mask, mask])
        c = torch.cat([class_emb, model.fake_latent.expand(B, -1).to(class_emb.dtype)])
    # mae encoder and decoder, in bf16 on GPUs
    with torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda):
        z = model.forward_decoder(model.forward_encoder(x, m, c), m)  # (B or 2B, L, D)
    # diffloss on the tokens revealed now, row-major as the official z[mask_to_pred]
    z_cond = z[:B][reveal].to(tokens.dtype)  # (n, D)
    z_uncond = z[B:][reveal].to(tokens.dtype) if guided else None
    if noise is None:
        noise = draw(torch.randn, (len(z_cond), C), generator, z.device)
    head = HEAD_SAMPLERS[head_sampler](model.diffloss.net, noise.to(z_cond), z_cond, z_uncond,
                                       cfg=cfg, steps=head_steps, temperature=temperature,
                                       generator=generator)  # (n, C)
    # tokens[reveal] = head, out of place
    return tokens.masked_scatter(reveal[..., None], head.to(tokens.dtype))


@torch.no_grad()
def sample_tokens(model, labels, num_iter=16, cfg=4.0, cfg_schedule="constant",
                  cfg_interval=(0.1, 0.3), head_sampler="dpm-solver", head_steps=8,
                  temperature=1.0, generator=None, mask_schedule=None):
    """labels (B,) int64 -> tokens (B, L, C) in K = num_iter steps, CFG on the steps whose next
    time is in cfg_interval = (t_min, t_max]. mask_schedule: the gamma_t that plans the reveals
    (Fig. 3a), None = the model's training one. `generator` drives all randomness (its device)."""
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown cfg schedule {cfg_schedule!r}: one of {CFG_SCHEDULES}")
    if mask_schedule is None:
        mask_schedule = model.mask_schedule
    B = len(labels)
    L = model.seq_len
    reveal_share = reveal_schedule(num_iter, mask_schedule)[1]  # (K,)
    guided = cfg_steps(num_iter, cfg, cfg_interval).tolist()
    # t = 1: every token masked (True); masked values are never read
    tokens = torch.zeros(B, L, model.token_channels, device=labels.device)
    mask = torch.ones(B, L, dtype=torch.bool, device=labels.device)
    class_emb = model.class_emb(labels)  # (B, D)
    for k in range(num_iter):
        if not mask[0].any():  # everything was revealed early (possible, rare)
            break
        reveal = choose_reveal(mask, reveal_share[k].item(), generator)  # (B, L)
        scale = cfg
        if cfg_schedule != "constant":
            still_masked = mask[0].sum().item() - reveal[0].sum().item()
            scale = cfg_scale(cfg, cfg_schedule, 1 - still_masked / L)
        tokens = predict_revealed(model, tokens, mask, reveal, class_emb, cfg=scale,
                                  guided=guided[k], head_sampler=head_sampler,
                                  head_steps=head_steps, temperature=temperature,
                                  generator=generator)
        mask = mask & ~reveal
    return tokens


# ==== 5. The paper's sampling settings (Tables 2, 3; the official evaluation scripts) =========
# (size, image size) -> K -> head steps, cfg, its schedule and the CFG interval (t_min, t_max].
# The paper names a setting by K and the NFE factor f: "16 x 1.2", "128 x 1.4", "64 x 1.25".
K16 = dict(head_steps=8, cfg=4.0, cfg_schedule="constant", cfg_interval=(0.1, 0.3))
K128 = dict(head_steps=14, cfg=4.0, cfg_schedule="constant", cfg_interval=(0.18, 0.6))
# 512 px: the official evaluation's intervals and head steps (8 at K = 16, 14 at K = 64)
K16_512 = dict(K16, cfg_interval=(0.15, 0.35))
K64_512 = dict(K128, cfg_interval=(0.25, 0.5))
PRESETS = {
    ("XS", 256): {16: K16, 128: K128},
    ("S", 256): {16: K16, 128: K128},
    ("B", 256): {16: K16, 128: dict(K128, cfg_interval=(0.05, 0.4))},
    ("L", 256): {16: K16, 128: K128},
    ("H", 256): {16: dict(K16, cfg_interval=(0.2, 0.4)),
                 128: dict(K128, cfg_interval=(0.3, 0.7))},
    ("XS", 512): {16: K16_512, 64: K64_512},
    ("S", 512): {16: K16_512, 64: K64_512},
    ("B", 512): {16: K16_512, 64: K64_512},
    ("L", 512): {16: K16_512, 64: K64_512},
    ("Tiny", 28): {16: dict(K16, cfg=3.0, cfg_interval=(0.0, 1.0))},  # the CPU demo's
}
ARCHITECTURE = ("seq_len", "token_channels", "width", "depth", "num_heads", "head_depth",
                "head_width")


@lru_cache(maxsize=None)
def preset_size(architecture):
    """The (size, image size) of PRESETS whose model has `architecture` (the values of the
    ARCHITECTURE fields), or None. The presets are built on the meta device: shapes only."""
    for size, img_size in PRESETS:
        with torch.device("meta"):
            config = emigm.create_emigm(size, img_size).config
        if tuple(config[name] for name in ARCHITECTURE) == architecture:
            return size, img_size
    return None


def settings(model, num_iter, head_sampler="dpm-solver", head_steps=None, cfg=None,
             cfg_schedule=None, cfg_interval=None, temperature=1.0, mask_schedule=None):
    """sample_tokens' keyword arguments: those given, the others (None) from the preset of the
    model's size at K = num_iter (the DDPM head: MAR's 100 steps)."""
    given = dict(head_steps=head_steps, cfg=cfg, cfg_schedule=cfg_schedule,
                 cfg_interval=cfg_interval)
    if head_sampler == "ddpm" and head_steps is None:
        given["head_steps"] = 100
    if None in given.values():
        size = preset_size(tuple(model.config[name] for name in ARCHITECTURE))
        preset = PRESETS.get(size, {}).get(num_iter)
        if preset is None:
            raise ValueError(f"--nfe {num_iter}: no preset for K = {num_iter} and this model "
                             f"(sample.PRESETS): pass --head-steps --cfg --cfg-schedule "
                             f"--cfg-interval")
        for name, value in given.items():
            if value is None:
                given[name] = preset[name]
    given["cfg_interval"] = tuple(given["cfg_interval"])
    return dict(num_iter=num_iter, head_sampler=head_sampler, temperature=temperature,
                mask_schedule=mask_schedule, **given)


# ==== Checkpoints, grids and the bulk .npz (DiT's sample.py and sample_ddp.py) ================
def default_tokenizer(config):
    """The tokenizer of a model's tokens: KL-16 (256 x 16), DC-AE (256 x 32), else pixels."""
    if config["seq_len"] != 256:
        return "pixel"
    return "dcae" if config["token_channels"] == 32 else "kl16"


def load_model(path, size=None, img_size=None, ema=True, device="cpu"):
    """-> (model in eval mode, its training flags). Ours rebuild from their 'config', official
    ones from size and img_size; a size or image size that disagrees with a config is an error."""
    checkpoint = emigm.load_checkpoint(path)  # one-line errors for unreadable files
    config = checkpoint.get("config")
    if config is None and size is None:
        raise ValueError(f"--ckpt {path} has no 'config' (an official one?): pass --size")
    if config is None:
        model = emigm.create_emigm(size, 256 if img_size is None else img_size)
    else:
        own_img_size = {"kl16": 256, "dcae": 512, "pixel": 28}[default_tokenizer(config)]
        found = None
        if size is not None:
            found = preset_size(tuple(config[name] for name in ARCHITECTURE))  # (size, img)
        if size is not None and (found is None or found[0] != size):
            kind = "custom" if found is None else f"{found[0]} at {found[1]} px"
            raise ValueError(f"--size {size} disagrees with --ckpt {path}, a {kind} model: the "
                             f"checkpoint's config wins, drop --size")
        if img_size not in (None, own_img_size):
            raise ValueError(f"--img-size {img_size} disagrees with --ckpt {path} "
                             f"({own_img_size} px): the checkpoint's config wins, drop --img-size")
        model = emigm.EMIGM(**config)
    try:
        emigm.load_weights(model, checkpoint, ema=ema)
    except ValueError as error:
        raise ValueError(f"--ckpt {path}: {error}") from None
    flags = checkpoint.get("args") or {}
    if isinstance(flags, argparse.Namespace):  # the official checkpoints'
        flags = vars(flags)
    return model.to(device).eval(), flags


def generate(model, tok, labels, sampler_kwargs, seed, device):
    """uint8 (B, H, W, 3) images (MAR's rounding, grey repeated for ADM), all from `seed`."""
    generator = torch.Generator(device).manual_seed(seed)
    tokens = sample_tokens(model, labels.to(device), generator=generator, **sampler_kwargs)
    with torch.no_grad():
        images = (tok.decode(tokens).float() + 1) / 2 * 255  # (B, 1 or 3, H, W)
    images = images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3)
    return images.cpu().numpy()


def save_grid(model, tok, classes, per_class, sampler_kwargs, seed, batch_size, path, device):
    """A PNG, a row of per_class images per class; batch j seeded batch_seed(seed, j), as bulk."""
    from PIL import Image
    labels = torch.tensor(classes).repeat_interleave(per_class)
    start = time.perf_counter()
    batches = []
    for j, rows in enumerate(labels.split(batch_size)):
        batches.append(generate(model, tok, rows, sampler_kwargs, batch_seed(seed, j), device))
    images = np.concatenate(batches)  # (N, H, W, 3) uint8
    rows = images.reshape(len(classes), per_class, *images.shape[1:]).swapaxes(1, 2)
    Image.fromarray(rows.reshape(rows.shape[0] * rows.shape[1], -1, 3)).save(path)
    seconds = (time.perf_counter() - start) / len(labels)
    print(f"wrote {path}; {seconds:.3f} s/image (first batch included)")


def grid(model, tok, sampler_kwargs, classes, per_class, seed, batch_size, path, device):
    """save_grid; classes None: every class of a model with <= 16, else DiT's 8 ImageNet."""
    if classes is None and model.num_classes > 16:
        classes = list(GRID_CLASSES)
    elif classes is None:
        classes = list(range(model.num_classes))
    save_grid(model, tok, classes, per_class, sampler_kwargs, seed, batch_size, path, device)


def bulk(model, tok, sampler_kwargs, num_images, out, seed, batch_size, rank, world_size,
         device, fid_ref=None, inception=None):
    """OUT/samples.npz: arr_0 the images, arr_1 the labels i % classes. Batch j, seeded from
    (seed, j), goes to rank j % world_size and its own file: the bytes do not depend on the number
    of processes; a restart skips written batches. fid_ref: metrics after sampling."""
    from tqdm import tqdm
    parts = Path(out) / "batches"
    labels = torch.arange(num_images) % model.num_classes
    batches = labels.split(batch_size)
    network = None
    if fid_ref not in (None, "fashion-mnist") and rank == 0:  # fail now, not after sampling
        import fid
        network = fid.load_inception(inception, device)
    parts.mkdir(parents=True, exist_ok=True)
    times = []  # (seconds, images) of each batch sampled here
    for j in tqdm(range(rank, len(batches), world_size), disable=rank != 0, desc="sampling"):
        if (parts / f"{j:06d}.npy").exists():
            continue
        start = time.perf_counter()
        images = generate(model, tok, batches[j], sampler_kwargs, batch_seed(seed, j), device)
        np.save(parts / f"tmp{rank}.npy", images)
        os.replace(parts / f"tmp{rank}.npy", parts / f"{j:06d}.npy")  # complete files only
        times.append((time.perf_counter() - start, len(batches[j])))
    if rank == 0 and len(times) > 1:
        seconds, count = np.sum(times[1:], axis=0)
        print(f"{seconds / count:.3f} s/image on rank 0 after a warm-up batch")
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        return
    arr = np.concatenate([np.load(parts / f"{j:06d}.npy") for j in range(len(batches))])
    np.savez(Path(out) / "samples.npz", arr_0=arr, arr_1=labels.numpy())
    shutil.rmtree(parts)
    per_class = num_images // model.num_classes
    print(f"wrote {Path(out) / 'samples.npz'}: {arr.shape} uint8, {per_class} per class")
    if fid_ref == "fashion-mnist":  # our offline metric for 28 x 28 data, not Inception FID
        import fid
        import tokenizer
        metric = fid.SmallDataMetric(*tokenizer.load_fashion_mnist("train"), str(METRIC_CACHE))
        print(fid.SmallDataMetric.label, metric.evaluate(arr[..., 0], labels.numpy()))
    elif fid_ref is not None:
        print(fid.compute_metrics(arr, fid_ref, model=network))


# ==== Run helpers shared with train.py (tokenizer.py keeps an identical setup_distributed) ====
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


def guidance_scale(text):
    """A CFG scale: 1 is no guidance."""
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1: pass a scale >= 1 (1 = no guidance)")
    return value


# ==== Benchmark: the sampler on random XS weights =============================================
def bench(bench_k=(16, 128), bench_batches=(1, 16, 64)):
    """Random-weight XS at 256 px: s/image at K = 16 and 128 per batch size and the share of the
    fp32 matmul peak, then the CFG-interval and linear-in-K checks, in CPU time (less disturbed
    than wall time by other jobs)."""
    torch.manual_seed(0)
    model = emigm.EMIGM_models["XS"]().eval()
    presets = PRESETS["XS", 256]
    flops = []
    # forward hooks: cheap, and they count exactly what runs (attention: q k^T and attn v)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(
                lambda m, i, o: flops.append(2 * i[0].numel() * m.out_features))
        elif isinstance(module, emigm.Attention):
            module.register_forward_hook(lambda m, i, o: flops.append(4 * o.numel() * o.shape[1]))
    peak = matmul_peak_flops(torch.device("cpu"), clock=time.process_time, repeats=5)
    threads = torch.get_num_threads()
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP per CPU-second ({threads} threads)")

    def timed(k, batch, interval):
        """One sample_tokens call -> (CPU seconds, FLOPs)."""
        flops.clear()
        cpu = time.process_time()
        wall = time.perf_counter()
        head_steps = presets[16 if k <= 16 else 128]["head_steps"]
        sample_tokens(model, torch.arange(batch), k, 4.0, "constant", interval, "dpm-solver",
                      head_steps, generator=torch.Generator().manual_seed(0))
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - wall
        f = nfe(k, 4.0, interval)[1]
        print(f"K={k:3d} NFE = {k} x {f:.4f} (interval {interval}), batch {batch:2d}: "
              f"{wall / batch:.3f} s/image wall, {cpu / batch:.3f} CPU-s/image, "
              f"{sum(flops) / 1e12:.3f} TFLOP, {sum(flops) / cpu / peak:.0%} of the matmul peak",
              flush=True)
        return cpu, sum(flops)

    timed(2, 1, (0.1, 0.3))  # warm-up
    results = {}
    for k in bench_k:
        for batch in bench_batches:
            results[k, batch] = timed(k, batch, presets[k]["cfg_interval"])
    b = bench_batches[0]  # both checks against K = 16 at the first batch size
    if (16, b) not in results:
        return
    cpu_16, flops_16 = results[16, b]
    cpu_all, flops_all = timed(16, b, (0.0, 1.0))
    f_16 = nfe(16, 4.0, presets[16]["cfg_interval"])[1]
    print(f"CFG interval (K=16, batch {b}): CPU time {presets[16]['cfg_interval']} / CFG on "
          f"every step = {cpu_16 / cpu_all:.3f}; NFE predicts {f_16 / 2:.3f}, FLOPs "
          f"{flops_16 / flops_all:.3f}")
    if (128, b) in results:
        cpu_128, flops_128 = results[128, b]
        f_128 = nfe(128, 4.0, presets[128]["cfg_interval"])[1]
        print(f"linear in K (batch {b}): CPU time K=128 / K=16 = {cpu_128 / cpu_16:.2f}; NFE "
              f"predicts {128 * f_128 / (16 * f_16):.2f}, FLOPs {flops_128 / flops_16:.2f}")


# ==== Command line: a grid for eyes, an ADM .npz for FID (the same bytes on any process count)
def check_writable(flag, path, folder):
    """Fail before sampling when `folder` (of `flag path`) is not a folder we can write in."""
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: {folder} is no folder we can write in: create it")


def check_flags(args):
    """The checks across flags and of the output paths, before any checkpoint is read."""
    if args.ckpt is None:
        raise ValueError("--ckpt is missing: pass --ckpt PATH (or --bench)")
    if (args.num_images is None) != (args.out is None):
        raise ValueError("--num-images and --out go together (bulk mode): pass both or neither")
    if args.cfg_interval is not None and not args.cfg_interval[0] < args.cfg_interval[1]:
        t_min, t_max = args.cfg_interval
        raise ValueError(f"--cfg-interval {t_min} {t_max}: pass T_MIN < T_MAX (CFG iff T_MIN < "
                         f"s <= T_MAX)")
    if args.fid_ref is not None and args.out is None:
        raise ValueError(f"--fid-ref {args.fid_ref} is for bulk mode: add --num-images, --out")
    ddpm_steps = args.head_steps if args.head_sampler == "ddpm" else None
    if ddpm_steps is not None and not 2 <= ddpm_steps <= 1000:
        raise ValueError(f"--head-steps {ddpm_steps}: DDPM respaces 1000 steps: pass 2 to 1000")
    for flag, path in (("--fid-ref", args.fid_ref), ("--inception", args.inception),
                       ("--vae", args.vae)):
        if path not in (None, "fashion-mnist") and not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist: pass an existing path")
    # the output paths, checked now rather than after sampling
    if args.out is None and Path(args.grid).is_dir():
        raise ValueError(f"--grid {args.grid} is a folder: pass a file name, e.g. samples.png")
    if args.out is None:
        check_writable("--grid", args.grid, Path(args.grid).parent)
        return
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file: pass a folder")
    existing = Path(args.out)  # the nearest existing folder must take the new one
    while not existing.exists():
        existing = existing.parent
    check_writable("--out", args.out, existing)


def run(args):
    """Check every flag, load the model and its tokenizer, then write a grid or a bulk .npz."""
    import tokenizer
    check_flags(args)
    ddp = setup_distributed()
    model, flags = load_model(args.ckpt, args.size, args.img_size, ema=not args.no_ema,
                              device=ddp.device)
    # the flags that must agree with the checkpoint's model
    num_classes = model.num_classes
    if args.classes is not None and max(args.classes) >= num_classes:
        raise ValueError(f"--classes {max(args.classes)}: the model has {num_classes} classes "
                         f"(0-{num_classes - 1})")
    if args.num_images is not None and args.num_images % num_classes:
        raise ValueError(f"--num-images {args.num_images}: pass a multiple of the "
                         f"{num_classes} classes")
    kind = default_tokenizer(model.config)
    if args.tokenizer not in (None, kind):
        raise ValueError(f"--tokenizer {args.tokenizer} disagrees with --ckpt {args.ckpt} "
                         f"({kind} tokens): the checkpoint wins, drop --tokenizer")
    sampler_kwargs = settings(model, args.num_iter, args.head_sampler, args.head_steps,
                              args.cfg, args.cfg_schedule, args.cfg_interval, args.temperature,
                              args.mask_schedule)
    if kind == "pixel":  # 28 x 28 images in square patches
        tok = tokenizer.load_tokenizer("pixel", patch=28 // math.isqrt(model.seq_len))
    else:
        vae = args.vae if args.vae is not None else flags.get("vae")
        tok = tokenizer.load_tokenizer(kind, vae)
    tok = tok.to(ddp.device).eval()
    if tok.channels != model.token_channels:
        raise ValueError(f"tokenizer {kind!r} gives {tok.channels} channels, the model takes "
                         f"{model.token_channels}")
    if ddp.rank == 0:
        k, f = nfe(args.num_iter, sampler_kwargs["cfg"], sampler_kwargs["cfg_interval"])
        print(f"NFE = {k} x {f:.4f} (~{k} x {f:.1f}); {sampler_kwargs}")
    if args.out is None:
        grid(model, tok, sampler_kwargs, args.classes, args.per_class, args.seed,
             args.batch_size, args.grid, ddp.device)
    else:
        bulk(model, tok, sampler_kwargs, args.num_images, args.out, args.seed, args.batch_size,
             ddp.rank, ddp.world_size, ddp.device, args.fid_ref, args.inception)
    if ddp.rank == 0:
        where = "allocated on the GPU" if ddp.device.type == "cuda" else "max RSS"
        print(f"peak memory {peak_memory_gb(ddp.device):.2f} GiB ({where})")
    if ddp.world_size > 1:
        dist.destroy_process_group()


def build_parser():
    """The flags; sampler settings left out (None) come from the preset of the size and K."""
    p = argparse.ArgumentParser(description="eMIGM sampling: a grid PNG, an ADM .npz, --bench")
    p.add_argument("--ckpt", help="ours (with a config) or an official one (then --size)")
    p.add_argument("--size", choices=list(emigm.EMIGM_models), help="official checkpoints only")
    p.add_argument("--img-size", type=int, choices=[256, 512], help="official checkpoints only")
    p.add_argument("--nfe", dest="num_iter", type=positive_int, default=16,
                   help="K, the mask-prediction steps (the paper names a setting by K: '128 x "
                        "1.4' is K = 128, NFE = 128 x 1.4 passes). Presets: 16, 128; 512 px: 16, 64")
    p.add_argument("--cfg", type=guidance_scale, help=">= 1 (preset: 4.0)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, help="preset: constant")
    p.add_argument("--cfg-interval", type=unit_interval, nargs=2, metavar=("T_MIN", "T_MAX"),
                   help="CFG iff T_MIN < s <= T_MAX, s the step's next time")
    p.add_argument("--mask-schedule", choices=list(emigm.SCHEDULES),
                   help="gamma_t of the reveals (Fig. 3a); default: the model's training one")
    p.add_argument("--head-sampler", default="dpm-solver", choices=list(HEAD_SAMPLERS))
    p.add_argument("--head-steps", type=positive_int, help="presets: 8 (K=16), 14; ddpm: 100")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="ddpm only")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--tokenizer", choices=["kl16", "dcae", "pixel"], help="default: the model's")
    p.add_argument("--vae", help="kl16.ckpt or the DC-AE diffusers directory")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=32, help="per process")
    p.add_argument("--classes", type=nonnegative_int, nargs="+", help="grid rows (default: all "
                   "classes if <= 16, else DiT's 8)")
    p.add_argument("--per-class", type=positive_int, default=8)
    p.add_argument("--grid", default="samples.png", help="the grid PNG, in an existing folder")
    p.add_argument("--num-images", type=positive_int, help="bulk mode: OUT/samples.npz")
    p.add_argument("--out", help="bulk mode folder")
    p.add_argument("--fid-ref", help="reference stats for fid.py, or 'fashion-mnist'")
    p.add_argument("--inception", help="Inception weights for --fid-ref")
    p.add_argument("--bench", action="store_true", help="time the sampler on random XS weights")
    p.add_argument("--bench-k", type=int, nargs="+", default=[16, 128], choices=[16, 128])
    p.add_argument("--bench-batches", type=positive_int, nargs="+", default=[1, 16, 64])
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.bench:
            bench(args.bench_k, args.bench_batches)
        else:
            run(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(error).split())}\n")


if __name__ == "__main__":
    main()
