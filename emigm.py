"""eMIGM: Effective and Efficient Masked Image Generation Models (You et al. 2025, arXiv 2503.07197).

The model of the paper in one file, computing the same function as the official code (ML-GSAI/eMIGM at de78623) with
the same state_dict layout, so official checkpoints load with strict=True:
  * mask schedules gamma_t (Table 4), the loss weighting w(t) (Fig. 2b) and time truncation t_min (Fig. 2d);
  * the training-time masking: one t per batch, the same number of masked tokens in every row (Sec. 3);
  * the MAE encoder/decoder (Fig. 2c) with 64 class-embedding buffer tokens, and "CFG with mask" (Fig. 2e):
    the mask token IS the fake (unconditional) class embedding;
  * the AdaLN MLP diffusion head of MAR and its loss (cosine schedule, 1000 steps, learned variance);
  * the size presets of Tables 2, 6 and 7 (XS..H at 256px, XS..L at 512px) plus a tiny CPU preset.
The sampler lives in sample.py, training in train.py. Run the tests with `python -m pytest -q test_emigm.py`.
"""
import argparse
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

# ==== Mask schedules (Table 4) and loss weighting (Fig. 2b) =======================================================
# gamma_t is the probability that a token is masked at time t; gamma_1 = 1 (all masked), gamma_0 = 0 (clean).
# Each entry: (gamma(t), gamma'(t)). 'poly0.5' and 'log' are the official code's extra options.
E5 = math.exp(5.0)
SCHEDULES = {
    "linear": (lambda t: t, lambda t: torch.ones_like(t)),
    "cosine": (lambda t: torch.cos(math.pi / 2 * (1 - t)), lambda t: math.pi / 2 * torch.sin(math.pi / 2 * (1 - t))),
    "exp": (lambda t: 1 - torch.exp(-5 * t), lambda t: 5 * torch.exp(-5 * t)),  # eMIGM's choice
    "poly0.5": (lambda t: t.sqrt(), lambda t: 0.5 / t.sqrt()),
    "log": (lambda t: torch.log1p((E5 - 1) * t) / 5, lambda t: (E5 - 1) / (5 * (1 + (E5 - 1) * t))),
}
WEIGHTINGS = ("constant", "mdm")
TRAIN_T_EPS = 1e-3  # training maps t to (1 - eps) t + eps so that gamma_t > 0 (official); the sampler uses 1e-5


def mask_ratio(t, schedule):
    """gamma_t of Table 4 (raw, no eps remap). t: float or tensor."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown mask schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[schedule][0](torch.as_tensor(t, dtype=torch.float32))


def loss_weight(t, schedule, weighting="constant"):
    """w(t) of Fig. 2b: 1 for eMIGM; MDM's ELBO weight -d(1 - gamma_t)/dt / gamma_t = gamma'_t / gamma_t."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}: choose 'constant' or 'mdm'")
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.ones_like(t) if weighting == "constant" else SCHEDULES[schedule][1](t) / mask_ratio(t, schedule)


def sample_mask(batch, seq_len, schedule="exp", t_min=0.2, generator=None, device=None):
    """The official training mask: one t ~ U[t_min, 1] per batch (time truncation, Fig. 2d), one Bernoulli(gamma_t)
    pattern with at least 2 masked tokens (else t and the pattern are redrawn), and each row a random shuffle of it,
    so every row has the same number of masked tokens (which the MAE encoder needs). Returns (mask (B, L) bool, t)."""
    while True:
        t = max(torch.rand((), generator=generator).item(), t_min)  # clamp from below, as the official clamp_t_min
        t = (1 - TRAIN_T_EPS) * t + TRAIN_T_EPS
        num_masked = int((torch.rand(seq_len, generator=generator) < mask_ratio(t, schedule)).sum())
        if num_masked >= 2:
            break
    # A uniformly random subset of num_masked positions per row = an independent shuffle of the pattern per row.
    order = torch.rand(batch, seq_len, generator=generator).argsort(dim=1)  # (B, L)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool).scatter_(1, order[:, :num_masked], True)
    return mask.to(device), t


# ==== Gaussian diffusion for the per-token head (IDDPM / DiT / MAR code, `create_diffusion("", "cosine")`) ========
class GaussianDiffusion:
    """Cosine noise schedule with T steps, epsilon prediction and learned-range variance (Nichol & Dhariwal 2021).
    Tables are computed in float64 and stored cast to float32: the official code looks entries up in float64 and
    casts after, which gives the same values."""

    def __init__(self, num_steps=1000, respace=None):
        s = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # (T,) float64
        self.timesteps = torch.arange(num_steps)  # the original step of each step, which the net sees
        if respace and respace != num_steps:  # IDDPM's respacing to `respace` evenly strided steps (MAR's DDPM sampler)
            self.timesteps = torch.tensor([round(i * ((num_steps - 1) / (respace - 1))) for i in range(respace)])
            kept = torch.cumprod(1 - betas, 0)[self.timesteps]
            betas = 1 - kept / torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
        self.num_steps = len(betas)
        ac = torch.cumprod(1 - betas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        post_var = betas * (1 - ac_prev) / (1 - ac)
        self.betas, self.alphas_cumprod = betas, ac  # float64, for the samplers
        self.tables64 = dict(
            sqrt_ac=ac.sqrt(), sqrt_1m_ac=(1 - ac).sqrt(), sqrt_recip_ac=(1 / ac).sqrt(),
            sqrt_recipm1_ac=(1 / ac - 1).sqrt(),
            # log of the posterior variance, its t=0 entry replaced by t=1's (it is 0 at t=0)
            post_logvar=torch.cat([post_var[1:2], post_var[1:]]).log(), log_betas=betas.log(),
            post_coef1=betas * ac_prev.sqrt() / (1 - ac), post_coef2=(1 - ac_prev) * (1 - betas).sqrt() / (1 - ac))
        self._tables = {}  # device -> float32 tables

    def table(self, name, t):
        """Entry t of a schedule table as float32, shaped (N, 1) to broadcast over channels. t: (N,) int64."""
        if t.device not in self._tables:
            self._tables[t.device] = {k: v.float().to(t.device) for k, v in self.tables64.items()}
        return self._tables[t.device][name][t][:, None]

    def q_sample(self, x0, t, noise):
        return self.table("sqrt_ac", t) * x0 + self.table("sqrt_1m_ac", t) * noise

    def q_posterior_mean(self, x0, x_t, t):
        return self.table("post_coef1", t) * x0 + self.table("post_coef2", t) * x_t

    def p_mean_logvar(self, eps, var_out, x_t, t):
        """Mean and log-variance of p(x_{t-1} | x_t) from the net's eps and learned-range variance outputs."""
        frac = (var_out + 1) / 2  # the net's v in [-1, 1] interpolates log beta_t and log posterior variance
        logvar = frac * self.table("log_betas", t) + (1 - frac) * self.table("post_logvar", t)
        x0 = self.table("sqrt_recip_ac", t) * x_t - self.table("sqrt_recipm1_ac", t) * eps
        return self.q_posterior_mean(x0, x_t, t), logvar

    def training_terms(self, net, x0, t, cond, noise):
        """Per-token loss terms {mse, vb, loss}, each (N,). x0: (N, C), t: (N,) int64, cond: (N, D), noise: (N, C).
        loss = mse on the noise + vb, the variational bound in bits, which trains only the variance output."""
        x_t = self.q_sample(x0, t, noise)
        out = net(x_t, t, cond).float()  # (N, 2C); the diffusion math below runs in fp32 even under autocast
        eps, var_out = out.chunk(2, dim=1)
        mean, logvar = self.p_mean_logvar(eps.detach(), var_out, x_t, t)  # eps detached: vb only trains variance
        true_mean, true_logvar = self.q_posterior_mean(x0, x_t, t), self.table("post_logvar", t)
        kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                    + (true_mean - mean) ** 2 * torch.exp(-logvar))
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)  # the t = 0 term is a decoder NLL
        vb = torch.where(t == 0, nll.mean(1), kl.mean(1)) / math.log(2.0)
        mse = ((noise - eps) ** 2).mean(1)
        return dict(mse=mse, vb=vb, loss=mse + vb)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log-likelihood of x under a Gaussian discretised into bins of width 2/255 (IDDPM, as in the official code)."""
    def cdf(v):  # the tanh approximation of the standard normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * torch.pow(v, 3))))
    inv_std = torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ==== The diffusion head: MAR's SimpleMLPAdaLN (keys diffloss.net.*) ==============================================
def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (possibly fractional) diffusion step, then an MLP."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):  # t: (N,)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # cos first, as the official code


class ResBlock(nn.Module):
    """h + gate * MLP(LN(h) * (1 + scale) + shift), the modulation computed from y = emb(t) + emb(z)."""

    def __init__(self, width):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, h, y):  # h, y: (N, w)
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return h + gate * self.mlp(modulate(self.in_ln(h), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, h, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The per-token denoiser eps_theta(x_t, t, z): x (N, C), t (N,), z (N, D) -> (N, 2C) = [eps | variance]."""

    def __init__(self, in_channels, width, out_channels, cond_dim, depth):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)

    def forward(self, x, t, c):
        h, y = self.input_proj(x), self.time_embed(t) + self.cond_embed(c)  # (N, w), (N, w)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)  # (N, 2C)

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.res_blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                           self.final_layer.linear]:
            nn.init.zeros_(layer.weight)  # zero-init: every block starts as the identity, the output at zero
            nn.init.zeros_(layer.bias)


class DiffLoss(nn.Module):
    """The head and its denoising loss on the condition vectors of the masked tokens."""

    def __init__(self, token_channels, cond_dim, depth, width, num_steps=1000):
        super().__init__()
        self.net = SimpleMLPAdaLN(token_channels, width, 2 * token_channels, cond_dim, depth)
        self.diffusion = GaussianDiffusion(num_steps)  # plain tensors, not buffers: no state_dict entries

    def forward(self, target, z, t=None, noise=None):
        """target (N, C) clean tokens, z (N, D) conditions; t ~ U{0..T-1} and noise ~ N(0, I) drawn per row unless
        given. Returns the per-token terms {mse, vb, loss}, each (N,)."""
        t = torch.randint(0, self.diffusion.num_steps, (len(target),), device=target.device) if t is None else t
        noise = torch.randn_like(target) if noise is None else noise
        return self.diffusion.training_terms(self.net, target.float(), t, z, noise)


# ==== The transformer: timm 0.9.12 Block layout, so that the official keys load ===================================
class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_dropout, proj_dropout):
        super().__init__()
        self.num_heads, self.attn_dropout = num_heads, attn_dropout
        self.qkv, self.proj, self.proj_drop = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Dropout(proj_dropout)

    def forward(self, x):  # x: (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, D)))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout)
        self.fc2, self.drop2 = nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with full bidirectional attention (no attention mask)."""

    def __init__(self, dim, num_heads, mlp_ratio, attn_dropout, proj_dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_dropout, proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ==== eMIGM =======================================================================================================
class EMIGM(nn.Module):
    """MAE encoder-decoder over continuous tokens + per-token diffusion head (Sec. 3, Fig. 2).
    tokens: (B, L, C) in row-major (h, w) order; mask: (B, L) bool, True = masked (to be predicted)."""

    def __init__(self, seq_len, token_channels, width, depth, num_heads, head_depth, head_width, num_classes=1000,
                 buffer_size=64, mlp_ratio=4.0, label_drop_prob=0.1, attn_dropout=0.1, proj_dropout=0.1,
                 mask_schedule="exp", loss_weighting="constant", t_min=0.2, use_mae=True, cfg_with_mask=True,
                 diffusion_batch_mul=4, decoder_depth=None):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if mask_schedule not in SCHEDULES or loss_weighting not in WEIGHTINGS:
            raise ValueError(f"mask_schedule must be one of {list(SCHEDULES)} and loss_weighting one of "
                             f"{list(WEIGHTINGS)}; got {mask_schedule!r}, {loss_weighting!r}")
        for name in ("seq_len", "token_channels", "num_classes", "buffer_size", "label_drop_prob", "mask_schedule",
                     "loss_weighting", "t_min", "use_mae", "diffusion_batch_mul"):
            setattr(self, name, self.config[name])
        block = partial(Block, width, num_heads, mlp_ratio, attn_dropout, proj_dropout)
        # Registration order = the official state_dict order. It matters for the tied vector below.
        self.fake_latent = nn.Parameter(torch.zeros(1, width))  # the unconditional ("fake") class embedding
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + seq_len, width))
        # CFG with mask (Fig. 2e): the mask token IS the fake class embedding, one Parameter under two names, as in
        # the official code. state_dict() holds both keys; parameters() lists it once (as fake_latent).
        self.mask_token = self.fake_latent if cfg_with_mask else nn.Parameter(torch.zeros(1, width))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + seq_len, width))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, width))
        self.class_emb = nn.Embedding(num_classes, width)
        self.z_proj = nn.Linear(token_channels, width)
        self.z_proj_ln = nn.LayerNorm(width, eps=1e-6)
        self.encoder_blocks = nn.ModuleList([block() for _ in range(depth)])
        self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_embed = nn.Linear(width, width)
        self.decoder_blocks = nn.ModuleList([block() for _ in range(decoder_depth or depth)])
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.initialize_weights()
        self.diffloss = DiffLoss(token_channels, width, head_depth, head_width)
        self.diffloss.net.initialize_weights()

    def initialize_weights(self):
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def class_embedding(self, labels):
        """class_emb(labels) (B, D); in training each row becomes the fake embedding with prob label_drop_prob."""
        emb = self.class_emb(labels)
        if self.training and self.label_drop_prob > 0:
            drop = torch.rand(len(labels), device=labels.device) < self.label_drop_prob  # (B,)
            emb = torch.where(drop[:, None], self.fake_latent.to(emb.dtype), emb)
        return emb

    def with_buffer(self, mask):  # (B, L) -> (B, buf + L): the buffer is never masked
        return F.pad(mask, (self.buffer_size, 0), value=False)

    def forward_encoder(self, tokens, mask, class_emb):
        """tokens (B, L, C), mask (B, L) bool, class_emb (B, D) -> (B, buf + #unmasked, D) (MAE) or (B, buf + L, D)."""
        B, L, _ = tokens.shape
        x = self.z_proj(tokens)  # (B, L, D); masked tokens are projected too, then dropped (MAE) or replaced
        if not self.use_mae:  # Fig. 2c without the MAE trick: masked tokens enter the encoder as the mask token
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        buffer = class_emb[:, None].to(x.dtype).expand(B, self.buffer_size, -1)  # every buffer slot holds the class
        x = self.z_proj_ln(torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned)  # (B, buf + L, D)
        if self.use_mae:  # keep only the unmasked tokens, in order; every row has the same count
            x = x[~self.with_buffer(mask)].reshape(B, -1, x.shape[-1])  # (B, buf + #unmasked, D)
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    def forward_decoder(self, x, mask):
        """x: the encoder output, mask (B, L) bool -> z (B, L, D), the conditions of the diffusion head."""
        x = self.decoder_embed(x)
        if self.use_mae:  # scatter the kept tokens into a sequence of mask tokens (not passed through decoder_embed)
            keep = ~self.with_buffer(mask)  # (B, buf + L)
            full = self.mask_token.to(x.dtype).expand(*keep.shape, -1).clone()  # (B, buf + L, D)
            full[keep] = x.reshape(-1, x.shape[-1])
            x = full
        x = x + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned  # (B, L, D)

    def forward(self, tokens, labels, mask=None):
        """Training loss (Sec. 3): tokens (B, L, C) clean tokens, labels (B,) -> scalar.
        mask (B, L) bool, optional: by default drawn with sample_mask (then also weighted by w(t))."""
        B, L, C = tokens.shape
        t = None
        if mask is None:
            mask, t = sample_mask(B, L, self.mask_schedule, self.t_min, device=tokens.device)
        z = self.forward_decoder(self.forward_encoder(tokens, mask, self.class_embedding(labels)), mask)  # (B, L, D)
        # Deviation from the official code, same objective: it runs the head on all B*L tokens and weights the loss
        # by the mask; the loss of unmasked tokens is multiplied by 0, so we run the head on the masked ones only.
        mul = self.diffusion_batch_mul  # copies of each token, each with its own diffusion step and noise
        terms = self.diffloss(tokens[mask].repeat(mul, 1), z[mask].repeat(mul, 1))  # N = mul * B * #masked rows
        weight = 1.0 if t is None else loss_weight(t, self.mask_schedule, self.loss_weighting).item()
        return terms["loss"].mean() * weight


# ==== Size presets (Table 2; head configs of Tables 6 and 7) and checkpoint loading ===============================
TOKENS = {256: dict(seq_len=256, token_channels=16),   # KL-16 VAE: 16x16 latents of 16 channels
          512: dict(seq_len=256, token_channels=32)}   # DC-AE f32c32: 16x16 latents of 32 channels
SIZES = {  # encoder = decoder (width, depth, heads); head (depth, width) at 256px and at 512px
    "XS": dict(width=448, depth=10, num_heads=8, head={256: (3, 1024), 512: (6, 1280)}),
    "S": dict(width=512, depth=12, num_heads=8, head={256: (3, 1024), 512: (6, 1280)}),
    "B": dict(width=768, depth=12, num_heads=12, head={256: (6, 1024), 512: (8, 1280)}),
    "L": dict(width=1024, depth=16, num_heads=16, head={256: (8, 1280), 512: (8, 1280)}),
    "H": dict(width=1280, depth=20, num_heads=16, head={256: (12, 1536)}),
}
# Tiny: the Fashion-MNIST CPU demo's model (train.py --demo): 28x28 images in 7x7 pixel patches, 16 tokens of 49
# values; head 3x256 on 4 copies of each masked token, no dropout. Not a paper model.
TINY = dict(seq_len=16, token_channels=49, width=192, depth=3, num_heads=4, head_depth=3, head_width=256,
            num_classes=10, buffer_size=4, diffusion_batch_mul=4, attn_dropout=0.0, proj_dropout=0.0)


def create_emigm(size, img_size=256, **overrides):
    """A paper-size eMIGM at 256 or 512 px (ImageNet, 1000 classes); overrides replace any constructor argument."""
    if size == "Tiny":
        return EMIGM(**{**TINY, **overrides})
    if size not in SIZES or img_size not in SIZES[size]["head"]:
        raise ValueError(f"no preset {size!r} at {img_size}px: choose a size in {list(EMIGM_models)} "
                         f"(H exists only at 256px)")
    arch = {k: v for k, v in SIZES[size].items() if k != "head"}
    head_depth, head_width = SIZES[size]["head"][img_size]
    return EMIGM(**{**TOKENS[img_size], **arch, "head_depth": head_depth, "head_width": head_width, **overrides})


EMIGM_models = {name: partial(create_emigm, name) for name in [*SIZES, "Tiny"]}


def config_from_state_dict(state):
    """The architecture fields of EMIGM read off a state_dict (ours or official)."""
    width, seq_len = state["fake_latent"].shape[1], state["diffusion_pos_embed_learned"].shape[1]
    return dict(width=width, seq_len=seq_len, token_channels=state["z_proj.weight"].shape[1],
                depth=sum(k.startswith("encoder_blocks.") and k.endswith(".norm1.weight") for k in state),
                decoder_depth=sum(k.startswith("decoder_blocks.") and k.endswith(".norm1.weight") for k in state),
                head_depth=sum(k.endswith(".in_ln.weight") for k in state),
                head_width=state["diffloss.net.input_proj.weight"].shape[0],
                num_classes=state["class_emb.weight"].shape[0],
                buffer_size=state["encoder_pos_embed_learned"].shape[1] - seq_len)


def size_of(config):
    """The flags of the preset whose architecture is config (from config_from_state_dict), e.g. '--size B'."""
    for name, img_size in [(n, i) for n in SIZES for i in SIZES[n]["head"]]:
        with torch.device("meta"):  # shapes only: no memory, no time
            if config_from_state_dict(create_emigm(name, img_size).state_dict()) == config:
                return f"--size {name} --img-size {img_size}"
    return "the checkpoint's own architecture"


def load_checkpoint(path):
    """Load one of our checkpoints or an official one with weights_only=True. The official files pickle an
    argparse.Namespace of their flags: that one class is allow-listed, nothing else."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}: pass the path of an eMIGM .pth/.pt file") from None
    except Exception as e:  # not a torch file, or one that pickles arbitrary objects
        raise ValueError(f"cannot read {path} as a checkpoint ({str(e).splitlines()[0][:200]}): "
                         f"pass an eMIGM checkpoint saved by train.py or the official code") from None
    if not isinstance(checkpoint, dict) or not ({"model", "ema", "model_ema"} & set(checkpoint)):
        raise ValueError(f"{path} holds no 'model'/'ema'/'model_ema' entry: pass an eMIGM checkpoint")
    return checkpoint


def load_weights(model, checkpoint, ema=True):
    """Load the EMA (default) or raw weights of a checkpoint ({'model', 'ema'} ours, {'model', 'model_ema'} official).
    Official EMA quirk (semantics sec. 2): the official model_ema holds the EMA value under 'fake_latent' but the RAW
    value under 'mask_token'; load_state_dict copies 'fake_latent' first and 'mask_token' second into the one tied
    Parameter, so the tied vector ends at the raw value. Same key order and tied Parameter here: the same result."""
    names = ("ema", "model_ema") if ema else ("model",)
    key = next((k for k in names if k in checkpoint), None)
    if key is None:
        raise ValueError(f"checkpoint has no {' or '.join(names)} entry (it has {sorted(checkpoint)}); "
                       f"{'pass --no-ema to use the raw weights' if ema else 'is it an eMIGM checkpoint?'}")
    state = checkpoint[key]
    ours, theirs = config_from_state_dict(model.state_dict()), config_from_state_dict(state)
    for field in ours:
        if ours[field] != theirs[field]:
            raise ValueError(f"checkpoint {field.replace('_', ' ')} {theirs[field]}, this model {ours[field]}: "
                             f"pass {size_of(theirs)}")
    model.load_state_dict(state, strict=True)
    return model
