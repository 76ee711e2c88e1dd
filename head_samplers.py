"""The diffusion head's samplers (eMIGM Sec. 3 and Fig. 3b; You et al. 2025, arXiv 2503.07197):
DPM-Solver++ (Lu et al. 2022) exactly as the official code (ML-GSAI/eMIGM at de78623) calls it,
and MAR's DDPM with learned variance. Each maps noise (n, C) and the transformer's conditions
(n, D) to tokens (n, C), with CFG when given the unconditional conditions. sample.py's
mask-prediction loop calls them through HEAD_SAMPLERS; tests: python -m pytest -q test_sample.py"""
from dataclasses import dataclass
from functools import lru_cache

import torch

import emigm

LAMBDA_CLIP = -5.1  # DPM-Solver drops the last steps with logSNR / 2 below this (4 of 1000)

def draw(fn, shape, generator, device):  # torch.rand or randn from `generator`, on its device
    if generator is None:
        return fn(shape, device=device)
    return fn(shape, generator=generator, device=generator.device).to(device)

# ==== 3a. The head sampler DPM-Solver++ (Lu et al. 2022) as the official code calls it ====
def interp(x, xp, yp):  # piecewise-linear through (xp, yp), xp increasing, extrapolated
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1) - 1
    return yp[i] + (x - xp[i]) * (yp[i + 1] - yp[i]) / (xp[i + 1] - xp[i])

@dataclass
class SolverTime:  # a time t of the solver, alpha_t and sigma_t (0-d fp32)
    t: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor

@dataclass
class SolverStep:  # s -> t, h = lambda_t - lambda_s; s1 and s2 at lambda_s + r1 h and + r2 h
    order: int
    s: SolverTime
    t: SolverTime
    h: torch.Tensor
    r1: torch.Tensor = None  # orders 2 and 3
    s1: SolverTime = None
    r2: torch.Tensor = None  # order 3
    s2: SolverTime = None

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
    def marginal_lambda(self, t):  # lambda_t = log(alpha_t / sigma_t)
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * torch.log(1 - torch.exp(2 * log_alpha))
    def inverse_lambda(self, lam):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        return interp(log_alpha, self.log_alpha_array.flip(0), self.t_array.flip(0))
    def at(self, t):
        log_alpha = self.marginal_log_mean_coeff(t)
        return SolverTime(t, log_alpha.exp(), torch.sqrt(1 - torch.exp(2 * log_alpha)))
    def time_steps(self, t_T, t_0, n):  # n + 1 times uniform in lambda (skip_type 'logSNR')
        lambda_T = self.marginal_lambda(torch.tensor(t_T)).item()
        lambda_0 = self.marginal_lambda(torch.tensor(t_0)).item()
        return self.inverse_lambda(torch.linspace(lambda_T, lambda_0, n + 1))

@lru_cache(maxsize=None)
def noise_schedule():
    return NoiseScheduleVP(emigm.GaussianDiffusion().betas)

@lru_cache(maxsize=None)
def dpm_plan(steps):
    """`steps` net calls: steps // 3 + 1 intervals uniform in lambda, order 3 but a tail of 2, 1."""
    ns = noise_schedule()
    num_intervals = steps // 3 + 1
    orders = [3] * (num_intervals - 1) + [steps % 3]
    if steps % 3 == 0:
        orders = [3] * (num_intervals - 2) + [2, 1]
    outer = ns.time_steps(1.0, 1.0 / ns.total_N, num_intervals)
    plan = []
    for s, t, order in zip(outer[:-1], outer[1:], orders):
        lambda_s = ns.marginal_lambda(s)
        step = SolverStep(order, ns.at(s), ns.at(t), ns.marginal_lambda(t) - lambda_s)
        # r1, r2 from a lambda-uniform split of [s, t], mapped t -> lambda -> t -> lambda
        lambdas = ns.marginal_lambda(ns.time_steps(s.item(), t.item(), order))  # (order + 1,)
        r = (lambdas - lambdas[0]) / (lambdas[-1] - lambdas[0])
        if order >= 2:
            step.r1 = r[1]
            step.s1 = ns.at(ns.inverse_lambda(lambda_s + r[1] * step.h))
        if order == 3:
            step.r2 = r[2]
            step.s2 = ns.at(ns.inverse_lambda(lambda_s + r[2] * step.h))
        plan.append(step)
    return plan

@torch.no_grad()
def dpm_solver_sample(net, noise, cond, uncond=None, cfg=1.0, steps=8, temperature=None,
                      generator=None):
    """DPM-Solver++, t = 1 to 1/996 in `steps` calls of net(x (N, C), t (1,), c (N, D))
    (eps first; t: every row's): noise (N, C), cond, uncond (N, D) -> x0 (N, C).
    (!) Ignores the temperature."""
    C = noise.shape[1]
    inv_N = 1.0 / noise_schedule().total_N
    guided = uncond is not None and cfg != 1.0
    c_in = torch.cat([uncond, cond]) if guided else cond  # one call on [x; x], DPM-Solver's
    def data_prediction(x, time):  # x0 = (x - sigma_t eps) / alpha_t
        # (!) the official time input (t - 1/N) * 1000, not the index t N - 1
        t_in = ((time.t - inv_N) * 1000).to(x.device).reshape(1)  # (1,): every row's
        eps = net(torch.cat([x, x]) if guided else x, t_in, c_in)[:, :C]  # (N or 2N, C)
        if guided:  # eps_u + cfg (eps_c - eps_u)
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

# ==== 3b. The head sampler DDPM with learned variance (MAR; the official online evaluation) ====
@lru_cache(maxsize=None)
def respaced(steps):  # IDDPM's space_timesteps: the 1000 steps respaced to `steps`
    return emigm.GaussianDiffusion(respace=steps)

@torch.no_grad()
def ddpm_sample(net, noise, cond, uncond=None, cfg=1.0, steps=100, temperature=1.0,
                generator=None):
    """Ancestral sampling (MAR's: the temperature scales the noise; CFG guides eps only)."""
    diffusion = respaced(steps)
    C = noise.shape[1]
    guided = uncond is not None and cfg != 1.0
    c_in = torch.cat([cond, uncond]) if guided else cond  # one call on [x; x], MAR's order
    x = noise
    for i in reversed(range(steps)):
        t = torch.full((1,), int(diffusion.timesteps[i]), device=x.device)  # unspaced, every row's
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
