"""eMIGM (You et al. 2025, arXiv 2503.07197): the model, the official code's function
(ML-GSAI/eMIGM at de78623), ablation paths included, and its state_dict layout.
Top-down: mask schedules (Table 4), weighting (Fig. 2b), masking (Sec. 3); linear layers;
MAR's head; the transformer; the model: MAE (Fig. 2c), CFG with mask (Fig. 2e); size
presets (Tables 2, 6, 7). Checkpoints: checkpoints.py; sampling: sample.py; training:
train.py; tests: python -m pytest -q test_emigm.py test_ablation.py"""
import inspect
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# ==== Mask schedules (Table 4), loss weighting (Fig. 2b), masking (Sec. 3) ====
# gamma_t: the share masked at t; official extras 'poly-0.5' (old 'poly0.5'), 'log'
SCHEDULES = ("linear", "cosine", "exp", "poly-0.5", "log")
WEIGHTINGS = ("constant", "mdm")
TRAIN_T_EPS = 1e-3  # training maps t to (1 - eps) t + eps, so gamma_t > 0

def check_choices(schedule, weighting="constant"):
    if schedule not in SCHEDULES and schedule != "poly0.5":
        raise ValueError(f"unknown mask schedule {schedule!r}: choose one of {SCHEDULES}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}: choose 'constant' or 'mdm'")

def mask_ratio(t, schedule):
    """gamma_t of Table 4 (no eps remap). t: float or tensor -> float32."""
    check_choices(schedule)
    t = torch.as_tensor(t, dtype=torch.float32)
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return torch.cos(math.pi / 2 * (1 - t))
    if schedule == "exp":  # eMIGM's choice
        return 1 - torch.exp(-5 * t)
    if schedule == "log":
        return torch.log1p((math.exp(5.0) - 1) * t) / 5
    return torch.sqrt(t)  # poly-0.5

def mask_ratio_derivative(t, schedule):
    """gamma'_t by autograd of mask_ratio: one formula per schedule."""
    with torch.inference_mode(False), torch.enable_grad():
        t = torch.as_tensor(t, dtype=torch.float32).clone().requires_grad_()
        return torch.autograd.grad(mask_ratio(t, schedule).sum(), t)[0]

def loss_weight(t, schedule, weighting="constant"):
    """w(t) of Fig. 2b: 1 (eMIGM, 'constant') or gamma'_t / gamma_t ('mdm')."""
    check_choices(schedule, weighting)
    t = torch.as_tensor(t, dtype=torch.float32)
    if weighting == "constant":
        return torch.ones_like(t)
    return mask_ratio_derivative(t, schedule) / mask_ratio(t, schedule)

def sample_mask(batch, seq_len, schedule="exp", t_min=0.2, generator=None, device=None):
    """The official training mask: one t for the batch, the same number of
    masked tokens (at least 2) in every row. -> (mask (B, L), t after the remap)."""
    while True:
        # time truncation (Fig. 2d): t ~ U[0, 1), clamped at t_min
        t = max(torch.rand((), generator=generator).item(), t_min)
        t = (1 - TRAIN_T_EPS) * t + TRAIN_T_EPS
        # one Bernoulli(gamma_t) pattern; redraw t and it below 2 masked
        pattern = torch.rand(seq_len, generator=generator) < mask_ratio(t, schedule)
        num_masked = int(pattern.sum())
        if num_masked >= 2:
            break
    # each row: a shuffle of the pattern = a random subset of that size
    order = torch.rand(batch, seq_len, generator=generator).argsort(dim=1)  # (B, L)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool).scatter_(1, order[:, :num_masked], True)
    return mask.to(device), t

def sample_mask_per_row(batch, seq_len, schedule, generator=None, device=None):
    """The official mask of MDM's weighting without MAE (Fig. 2b, 2c): t per row,
    no t_min, independent tokens (any count, even none). -> (mask, t (B,))."""
    t = torch.rand(batch, generator=generator)
    t = (1 - TRAIN_T_EPS) * t + TRAIN_T_EPS  # (B,)
    gamma = mask_ratio(t, schedule)  # (B,)
    mask = torch.rand(batch, seq_len, generator=generator) < gamma[:, None]  # (B, L)
    return mask.to(device), t.to(device)

# ==== Linear layers: oneDNN's kernels on CPU ====
ONEDNN = torch.backends.mkldnn.is_available()  # False: MKL's, the official bits

class OneDNNLinear(torch.autograd.Function):
    """F.linear: oneDNN for the output and the input's gradient, MKL's mm for the
    weight's (oneDNN is no faster there)."""
    @staticmethod
    def forward(ctx, x, weight, bias):  # the bias added inside the kernel
        ctx.save_for_backward(x, weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):  # grad (..., out)
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        grad_x = OneDNNLinear.apply(grad, weight.t(), None) if needs_x else None
        rows = grad.reshape(-1, grad.shape[-1])  # (M, out)
        grad_weight = rows.t().mm(x.reshape(-1, x.shape[-1])) if needs_weight else None
        grad_bias = rows.sum(0) if needs_bias else None
        return grad_x, grad_weight, grad_bias

def linear(x, weight, bias, packed=None):
    """F.linear; eager fp32 on CPU: oneDNN's (prepacked without autograd; README)."""
    fp32_cpu = x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
    eager = not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
    if ONEDNN and fp32_cpu and eager:
        if packed is not None and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)

class Linear(nn.Linear):  # nn.Linear's keys, through linear()
    packed = None  # the weight in oneDNN's layout while sampling (cli.py)
    def forward(self, x):
        return linear(x, self.weight, self.bias, self.packed)

# ==== The head's diffusion (IDDPM / DiT / MAR: create_diffusion("", "cosine")) ====
def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log-likelihood of x under a Gaussian discretised in bins of width 2/255."""
    def approx_standard_normal_cdf(v):  # tanh approximation
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    centered_x = x - mean
    inv_stdv = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1 / 255))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # the edge bins reach to -inf and +inf
    inner = torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    return torch.where(x < -0.999, log_cdf_plus, inner)

class GaussianDiffusion:
    """IDDPM's diffusion: cosine schedule, eps prediction, learned-range variance; float64
    tables of IDDPM's names, float32 after the lookup; respace: IDDPM's respacing."""
    def __init__(self, num_steps=1000, respace=None):
        # alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)
        s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # (T,)
        # the original step of each step: what the net sees
        self.timesteps = torch.arange(num_steps)
        if respace is not None and respace != num_steps:
            stride = (num_steps - 1) / (respace - 1) if respace > 1 else 0.0
            self.timesteps = torch.tensor([round(i * stride) for i in range(respace)])
            # the kept steps keep their alpha_bar
            kept = torch.cumprod(1 - betas, 0)[self.timesteps]
            betas = 1 - kept / F.pad(kept[:-1], (1, 0), value=1.0)
        self.num_steps = len(betas)
        self.betas = betas
        self.log_betas = torch.log(betas)
        alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0)
        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0); log variance clipped: entry 0 (log 0) is entry 1's
        one_minus = 1 - self.alphas_cumprod
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / one_minus
        variance = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        self.posterior_log_variance_clipped = torch.log(variance)
        self.posterior_mean_coef1 = betas * torch.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / one_minus
        self._float32_tables = {}  # device -> {name: float32 table}

    def _extract(self, name, t):
        """Entry t (N,) of table `name`, float32 (N, 1) (_extract_into_tensor)."""
        if t.device not in self._float32_tables:
            tables = {n: v.float().to(t.device) for n, v in vars(self).items()
                      if torch.is_tensor(v) and v.is_floating_point()}
            self._float32_tables[t.device] = tables
        return self._float32_tables[t.device][name][t][:, None]

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        mean = self._extract("sqrt_alphas_cumprod", t) * x0
        return mean + self._extract("sqrt_one_minus_alphas_cumprod", t) * noise

    def q_posterior_mean(self, x0, x_t, t):
        """The mean of q(x_{t-1} | x_t, x0)."""
        mean = self._extract("posterior_mean_coef1", t) * x0
        return mean + self._extract("posterior_mean_coef2", t) * x_t

    def p_mean_logvar(self, eps, var_out, x_t, t):
        """Mean and log-variance of p(x_{t-1} | x_t) from the net's outputs."""
        # v in [-1, 1] interpolates log beta_t and the log posterior variance
        frac = (var_out + 1) / 2
        max_log = self._extract("log_betas", t)
        min_log = self._extract("posterior_log_variance_clipped", t)
        logvar = frac * max_log + (1 - frac) * min_log
        # x0 predicted from eps, then the posterior mean given it
        x0 = self._extract("sqrt_recip_alphas_cumprod", t) * x_t
        x0 = x0 - self._extract("sqrt_recipm1_alphas_cumprod", t) * eps
        return self.q_posterior_mean(x0, x_t, t), logvar

    def training_terms(self, net, x0, t, cond, noise):
        """IDDPM's training_losses per token: x0, noise (N, C), t (N,), cond (N, D)
        -> {mse, vb, loss} (N,); loss = mse + vb (the variational bound in bits)."""
        x_t = self.q_sample(x0, t, noise)
        # in x0's dtype: fp32 also under bf16 autocast
        out = net(x_t, t, cond).to(x0.dtype)  # (N, 2C)
        eps, var_out = out.chunk(2, dim=1)
        # eps detached: vb trains the variance output only
        mean, logvar = self.p_mean_logvar(eps.detach(), var_out, x_t, t)
        true_mean = self.q_posterior_mean(x0, x_t, t)
        true_logvar = self._extract("posterior_log_variance_clipped", t)
        # KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
        kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                    + ((true_mean - mean) ** 2) * torch.exp(-logvar))  # (N, C)
        # at t = 0: the decoder NLL of x0
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)  # (N, C)
        vb = torch.where(t == 0, nll.mean(1), kl.mean(1)) / math.log(2.0)
        mse = ((noise - eps) ** 2).mean(1)
        return dict(mse=mse, vb=vb, loss=mse + vb)

# ==== The diffusion head: MAR's SimpleMLPAdaLN (keys diffloss.net.*) ====
def modulate(x, shift, scale):
    return x * (1 + scale) + shift

class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (maybe fractional) step, then an MLP."""
    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, width), nn.SiLU(), Linear(width, width))

    def forward(self, t):  # t: (N,)
        half = self.freq_dim // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(-math.log(10000) * exponents)  # (half,)
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))  # (N, w)

class ResBlock(nn.Module):
    """h + gate * MLP(LN(h) * (1 + scale) + shift); y = emb(t) + emb(z)."""
    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(Linear(width, width), nn.SiLU(), Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(width, 3 * width))

    def forward(self, h, y_act):  # h, y_act = SiLU(y): (N, w)
        # adaLN_modulation = SiLU, Linear: SiLU(y) comes once for all blocks
        shift, scale, gate = self.adaLN_modulation[1](y_act).chunk(3, dim=-1)
        return h + gate * self.mlp(modulate(self.in_ln(h), shift, scale))

class FinalLayer(nn.Module):
    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(width, 2 * width))

    def forward(self, h, y_act):  # h, y_act = SiLU(y): (N, w)
        shift, scale = self.adaLN_modulation[1](y_act).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))

class SimpleMLPAdaLN(nn.Module):
    """eps_theta(x_t, t, z): x (N, C), t (N,), z (N, D) -> [eps | var] (N, 2C)."""
    def __init__(self, in_channels, width, out_channels, cond_dim, depth):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = Linear(cond_dim, width)
        self.input_proj = Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)

    def forward(self, x, t, c):
        """t: (N,) or (1,) for every row (the samplers: one time per call)."""
        h = self.input_proj(x)  # (N, w)
        # each distinct step embedded once (~1000 steps, many more tokens)
        steps, index = t.unique(return_inverse=True)
        time_emb = self.time_embed(steps)[index]  # (N or 1, w)
        y = time_emb + self.cond_embed(c)  # (N, w), for every block
        y_act = F.silu(y)  # the first step of every adaLN_modulation
        for block in self.res_blocks:
            h = block(h, y_act)
        return self.final_layer(h, y_act)  # (N, 2C)

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # zero-init: blocks start as the identity, the output at zero
        zero = [block.adaLN_modulation[-1] for block in self.res_blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

class DiffLoss(nn.Module):
    """The head and its denoising loss, on the masked tokens' conditions."""
    def __init__(self, token_channels, cond_dim, depth, width, num_steps=1000):
        super().__init__()
        self.net = SimpleMLPAdaLN(token_channels, width, 2 * token_channels, cond_dim, depth)
        # plain tensors, not buffers: no state_dict entries
        self.diffusion = GaussianDiffusion(num_steps)

    def forward(self, target, z, t=None, noise=None):
        """target (N, C), z (N, D); steps t ~ U{0..T-1} and noise ~ N(0, I) drawn
        per row unless given. -> {mse, vb, loss}, each (N,)."""
        if t is None:
            t = torch.randint(0, self.diffusion.num_steps, (len(target),), device=target.device)
        if noise is None:
            noise = torch.randn_like(target)
        # at least fp32: the diffusion math never runs in bf16
        x0 = target.to(torch.promote_types(target.dtype, torch.float32))
        return self.diffusion.training_terms(self.net, x0, t, z, noise)

# ==== The transformer: timm 0.9.12's Block, so the official keys load ====
def dropout_keep(x, p):
    """A CPU dropout mask like x, True with probability 1 - p (to 2^-32): 32-bit integers
    cut from 64-bit draws, ~3x cheaper than torch's bernoulli_."""
    words = torch.randint(-2**63, 2**63 - 1, ((x.numel() + 1) // 2,), dtype=torch.int64)
    bits = words.view(torch.int32)[:x.numel()].view(x.shape)  # uniform int32
    return bits >= round(p * 2**32) - 2**31

class Dropout(nn.Dropout):
    """nn.Dropout: zero with probability p, else x / (1 - p); in training on CPU
    dropout_keep's masks, else torch's (x itself in eval or at p = 0)."""
    def forward(self, x):
        if x.device.type != "cpu" or not self.training or self.p == 0:
            return F.dropout(x, self.p, self.training)
        return torch.where(dropout_keep(x, self.p), x, 0.0) * (1 / (1 - self.p))

class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_dropout, proj_dropout):
        super().__init__()
        self.num_heads = num_heads
        self.attn_dropout = attn_dropout
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.proj_drop = Dropout(proj_dropout)

    def forward(self, x, queries=None):
        """x (B, N, D) -> (B, N, D); with queries (B, n, D): their outputs (B, n, D),
        attending to all of x (the last decoder block: where the head reads)."""
        B, N, D = x.shape
        head_dim = D // self.num_heads
        if queries is None:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, D / H)
        else:
            # q from the queries, k and v from all of x: the rows of qkv's weight
            q = linear(queries, self.qkv.weight[:D], self.qkv.bias[:D])  # (B, n, D)
            q = q.reshape(B, -1, self.num_heads, head_dim).transpose(1, 2)  # (B, H, n, D / H)
            kv = linear(x, self.qkv.weight[D:], self.qkv.bias[D:])  # (B, N, 2D)
            k, v = kv.reshape(B, N, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        # full bidirectional attention, no mask
        if self.training and self.attn_dropout > 0 and x.device.type == "cpu":
            # SDPA's math path, dropout_keep's masks; both scales on the small side
            attn = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, n, N)
            keep = dropout_keep(attn, self.attn_dropout)
            x = (torch.where(keep, attn, 0.0) @ v) * (1 / (1 - self.attn_dropout))
        else:
            dropout_p = self.attn_dropout if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, H, n, D / H)
        x = x.transpose(1, 2).reshape(B, -1, D)
        return self.proj_drop(self.proj(x))  # (B, n, D)

class Mlp(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = Dropout(dropout)
        self.fc2 = Linear(hidden, dim)
        self.drop2 = Dropout(dropout)

    def forward(self, x):
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))

class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
    def __init__(self, dim, num_heads, mlp_ratio, attn_dropout, proj_dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_dropout, proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_dropout)

    def forward(self, x, read=None):
        """x (B, N, D) -> (B, N, D); with read (B, n): the outputs there (B, n, D)."""
        if read is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        h = self.norm1(x)
        x = x.take_along_dim(read[..., None], dim=1)  # (B, n, D)
        x = x + self.attn(h, queries=h.take_along_dim(read[..., None], dim=1))
        return x + self.mlp(self.norm2(x))

class Blocks(nn.ModuleList):
    """Blocks in order, the last with `read`; torch.compile takes it whole."""
    def forward(self, x, read=None):
        for block in self[:-1]:
            x = block(x)
        if len(self) == 0:  # no block (a test's model): read directly
            return x if read is None else x.take_along_dim(read[..., None], dim=1)
        return self[-1](x, read)

# ==== eMIGM (Sec. 3, Fig. 2) ====
class EMIGM(nn.Module):
    """MAE encoder-decoder, per-token head; tokens (B, L, C), mask (B, L) bool."""
    def __init__(self, seq_len, token_channels, width, depth, num_heads, head_depth, head_width,
                 num_classes=1000, buffer_size=64, mlp_ratio=4.0, label_drop_prob=0.1,
                 attn_dropout=0.1, proj_dropout=0.1, mask_schedule="exp",
                 loss_weighting="constant", t_min=0.2, use_mae=True, cfg_with_mask=True,
                 diffusion_batch_mul=4, decoder_depth=None):
        super().__init__()
        check_choices(mask_schedule, loss_weighting)
        # the arguments, kept in checkpoints: EMIGM(**model.config) rebuilds it
        arguments = locals()
        self.config = {name: arguments[name] for name in inspect.signature(EMIGM).parameters}
        self.seq_len = seq_len
        self.token_channels = token_channels
        self.num_classes = num_classes
        self.buffer_size = buffer_size
        self.label_drop_prob = label_drop_prob
        self.mask_schedule = mask_schedule
        self.loss_weighting = loss_weighting
        self.t_min = t_min
        self.use_mae = use_mae
        self.diffusion_batch_mul = diffusion_batch_mul
        self.per_row_masking = loss_weighting == "mdm" and not use_mae  # official: t per row
        decoder_depth = depth if decoder_depth is None else decoder_depth
        # in the official state_dict order; fake_latent: the fake class
        self.fake_latent = nn.Parameter(torch.zeros(1, width))
        num_positions = buffer_size + seq_len
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, num_positions, width))
        if cfg_with_mask:
            # CFG with mask (Fig. 2e): the mask token IS the fake class (tied)
            self.mask_token = self.fake_latent
        else:
            # Fig. 2e's baseline: its own mask token, [1, 1, D] (official)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, num_positions, width))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, width))
        self.class_emb = nn.Embedding(num_classes, width)
        self.z_proj = Linear(token_channels, width)
        self.z_proj_ln = nn.LayerNorm(width, eps=1e-6)
        block = partial(Block, width, num_heads, mlp_ratio, attn_dropout, proj_dropout)
        self.encoder_blocks = Blocks([block() for _ in range(depth)])
        self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_embed = Linear(width, width)
        self.decoder_blocks = Blocks([block() for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.initialize_weights()
        # the head initialises itself, after the transformer (official order)
        self.diffloss = DiffLoss(token_channels, width, head_depth, head_width)
        self.diffloss.net.initialize_weights()

    def initialize_weights(self):
        embeddings = (self.class_emb.weight, self.fake_latent, self.mask_token,
                      self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                      self.diffusion_pos_embed_learned)
        for p in embeddings:
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def class_embedding(self, labels):
        """class_emb(labels) (B, D); in training, label dropout: each row is the
        fake embedding with probability label_drop_prob (CFG's unconditional)."""
        emb = self.class_emb(labels)
        if self.training and self.label_drop_prob > 0:
            drop = torch.rand(len(labels), device=labels.device) < self.label_drop_prob  # (B,)
            emb = torch.where(drop[:, None], self.fake_latent.to(emb.dtype), emb)
        return emb

    def forward_encoder(self, tokens, mask, class_emb):
        """tokens (B, L, C), mask (B, L) bool, class_emb (B, D)
        -> (B, buf + #unmasked, D) with MAE (Fig. 2c), (B, buf + L, D) without."""
        B, L, C = tokens.shape
        # all tokens projected; masked ones dropped or overwritten below
        x = self.z_proj(tokens)  # (B, L, D)
        # buffer: every slot holds the class embedding
        buffer = class_emb[:, None].to(x.dtype).expand(B, self.buffer_size, -1)
        x = torch.cat([buffer, x], dim=1)  # (B, buf + L, D)
        # position embedding, then the LayerNorm (official order)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        # the buffer is never masked
        mask = F.pad(mask, (self.buffer_size, 0), value=False)  # (B, buf + L)
        if self.use_mae:
            # MAE: keep the unmasked positions (the same count in every row)
            x = x[~mask].reshape(B, -1, x.shape[-1])  # (B, buf + #unmasked, D)
        else:
            # no MAE: the raw mask token, after the pos embed and LN (official)
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = self.encoder_blocks(x)
        return self.encoder_norm(x)

    def forward_decoder(self, x, mask, read=None):
        """x: encoder output, mask (B, L) -> z (B, L, D), the head's conditions; with read
        (B, L) bool, n per row: z[read] (B, n, D), the last block only there."""
        x = self.decoder_embed(x)
        if self.use_mae:
            # kept tokens among mask tokens (which skip decoder_embed)
            keep = ~F.pad(mask, (self.buffer_size, 0), value=False)  # (B, buf + L)
            full = self.mask_token.to(x.dtype).expand(*keep.shape, -1).clone()
            full[keep] = x.reshape(-1, x.shape[-1])
            x = full  # (B, buf + L, D)
        x = x + self.decoder_pos_embed_learned
        B, L = mask.shape
        # the positions read, row-major (the official z[mask]); n per row
        positions = torch.arange(L, device=mask.device).expand(B, L)  # (B, L): all
        if read is not None:
            positions = read.nonzero()[:, 1].reshape(B, -1)  # (B, n)
        # the head reads no buffer slot: the last block leaves them out
        x = self.decoder_blocks(x, positions + self.buffer_size)  # (B, n, D)
        x = self.decoder_norm(x)
        # one condition per token read
        pos_embed = self.diffusion_pos_embed_learned[0, positions]  # (B, n, D)
        return x + pos_embed

    def forward(self, tokens, labels, mask=None, t=None, head_t=None, head_noise=None):
        """The training loss of Sec. 3 (Table 1's objective with MAR's head loss):

            loss = w(t) * 1/|M| * sum_{i in M} l_i,    l_i = mse_i + vb_i

        M: the masked tokens, each diffusion_batch_mul times with its own step and noise;
        l_i: the head's loss on token i given z_i (training_terms); t: the masking time
        of the batch; w(t) = 1 (eMIGM) or gamma'_t / gamma_t (MDM). MDM's weighting
        without MAE has t per row (official): w moves inside the sum.
        tokens (B, L, C), labels (B,) -> scalar. To replay a run (None: drawn): mask
        (B, L); t: float or (B,), remapped as sample_mask's (none: w = 1); head_t (mul*B*L,)
        and head_noise (mul*B*L, C) in the official row order (B*L tiled mul times)."""
        B, L, C = tokens.shape
        # masking (Fig. 2a, 2d)
        if mask is None and self.per_row_masking:
            mask, t = sample_mask_per_row(B, L, self.mask_schedule, device=tokens.device)
        elif mask is None:
            mask, t = sample_mask(B, L, self.mask_schedule, self.t_min, device=tokens.device)
        # MAE encoder and decoder: one condition z_i per token
        x = self.forward_encoder(tokens, mask, self.class_embedding(labels))
        # the head on the masked tokens only (official: on all, loss times the mask);
        # MAE masks as many in every row: the last block computes only those
        read = mask if self.use_mae else None
        z = self.forward_decoder(x, mask, read)  # (B, |M| / B or L, D)
        z = z.reshape(-1, z.shape[-1]) if self.use_mae else z[mask]  # (|M|, D)
        mul = self.diffusion_batch_mul
        target = tokens[mask].repeat(mul, 1)  # (N, C), N = mul * |M|
        cond = z.repeat(mul, 1)  # (N, D)
        if head_t is not None:
            rows = mask.flatten().repeat(mul)  # (mul * B * L,)
            head_t = head_t[rows]
            head_noise = head_noise[rows]
        head_loss = self.diffloss(target, cond, head_t, head_noise)["loss"]  # (N,)
        # w(t) (Fig. 2b): 1 for eMIGM, no product; per row with per-row masking
        if t is not None and self.loss_weighting != "constant":
            weight = loss_weight(t, self.mask_schedule, self.loss_weighting)  # () or (B,)
            if weight.dim() == 1:
                weight = weight.to(mask.device)[:, None].expand(B, L)[mask].repeat(mul)  # (N,)
            head_loss = weight * head_loss
        # 1/|M| * sum_{i in M}; with nothing masked (per-row masking) 0, not 0 / 0
        return head_loss.sum() / max(len(head_loss), 1)

# ==== Size presets (Table 2; the heads of Tables 6 and 7) ====
# 256px: KL-16 VAE, 16x16 latents of 16 channels; 512px: DC-AE f32c32, 32 channels
TOKENS = {256: dict(seq_len=256, token_channels=16), 512: dict(seq_len=256, token_channels=32)}
# encoder = decoder (width, depth, heads); head: image size -> (head depth, head width)
SIZES = {
    "XS": dict(width=448, depth=10, num_heads=8, head={256: (3, 1024), 512: (6, 1280)}),
    "S": dict(width=512, depth=12, num_heads=8, head={256: (3, 1024), 512: (6, 1280)}),
    "B": dict(width=768, depth=12, num_heads=12, head={256: (6, 1024), 512: (8, 1280)}),
    "L": dict(width=1024, depth=16, num_heads=16, head={256: (8, 1280), 512: (8, 1280)}),
    "H": dict(width=1280, depth=20, num_heads=16, head={256: (12, 1536)}),
}
# Tiny: the CPU demo's model (train.py --demo): 28x28 Fashion-MNIST in 7x7
# pixel patches, 16 tokens of 49 values; a 3x256 head on 4 copies of each masked token.
TINY = dict(seq_len=16, token_channels=49, width=192, depth=3, num_heads=4, head_depth=3,
            head_width=256, num_classes=10, buffer_size=4, diffusion_batch_mul=4,
            attn_dropout=0.0, proj_dropout=0.0)

def create_emigm(size, img_size=256, **overrides):
    """A preset ('Tiny' or a paper size at 256/512 px); overrides: arguments."""
    if size == "Tiny":
        return EMIGM(**{**TINY, **overrides})
    if size not in SIZES or img_size not in SIZES[size]["head"]:
        raise ValueError(f"no preset {size!r} at {img_size}px: choose a size in "
                         f"{[*SIZES, 'Tiny']} (H exists only at 256px)")
    preset = SIZES[size]
    head_depth, head_width = preset["head"][img_size]
    config = dict(**TOKENS[img_size], width=preset["width"], depth=preset["depth"],
                  num_heads=preset["num_heads"], head_depth=head_depth, head_width=head_width)
    return EMIGM(**{**config, **overrides})

EMIGM_models = {name: partial(create_emigm, name) for name in [*SIZES, "Tiny"]}
