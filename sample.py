"""Sampling from eMIGM (You et al. 2025, arXiv 2503.07197), Sec. 3 and Fig. 3,
as the official code (ML-GSAI/eMIGM at de78623) does it:
- K steps on t = linspace(1, 1e-5, K + 1); the step t -> s reveals the share
  1 - gamma_s / gamma_t of the masked tokens (gamma_t: the mask schedule);
- the diffusion head samples the revealed tokens (DPM-Solver++ or MAR's DDPM,
  head_samplers.py);
- CFG (Fig. 2e) iff s is in (t_min, t_max] (Fig. 3c): NFE = K x f.
Deviations, same distribution: one draw picks every row's tokens; DDPM with
CFG draws the conditional half's noise only.
labels=None: the fake class embedding, no CFG. Inpainting starts from `known`
tokens (inpaint.py).

  python sample.py --ckpt PATH --nfe 16      # grid PNG, one row per class
  torchrun --nproc_per_node 8 sample.py --ckpt PATH --nfe 128 \\
      --num-images 50000 --out DIR           # ADM .npz for FID
  python sample.py --ckpt PATH --inpaint fashion-mnist --region bottom
  python sample.py --ckpt PATH --unconditional
  python sample.py --bench                   # speed, random weights
"""
import argparse
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoints
import emigm
from head_samplers import HEAD_SAMPLERS, draw
from cli import batch_seed, compile_model, guidance_scale, nonnegative_int, packed_weights
from cli import peak_memory_gb, positive_float, positive_int, setup_distributed, unit_interval

# the sampler's last time (training uses emigm.TRAIN_T_EPS)
SAMPLER_EPS = 1e-5
# the grid's ImageNet classes (DiT's sample.py)
GRID_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
# small_metric.py's cache (its CNN and the training split's statistics)
METRIC_CACHE = Path.home() / ".cache" / "emigm-mini" / "small_metric.pt"
# the options of cfg_scale
CFG_SCHEDULES = ("constant", "linear", "power", "cubic", "exp", "cosine")

# ==== 1. The reveal schedule (Sec. 3; the mask schedule gamma_t of Fig. 3a) ====
def reveal_schedule(num_iter, schedule="exp", t0=1.0):
    """Times t0 = t_0 > ... > t_K = 1e-5, shape (K + 1,), and each step's share:
    the step t -> s reveals 1 - gamma_s / gamma_t of the masked tokens."""
    # float32, as the official code
    times = torch.linspace(t0, SAMPLER_EPS, num_iter + 1)  # (K + 1,)
    gamma_s = emigm.mask_ratio(times[1:], schedule)  # (K,)
    gamma_t = emigm.mask_ratio(times[:-1], schedule)  # (K,)
    share = 1 - gamma_s / gamma_t
    # the last step reveals everything
    share[-1] = 1.0
    return times, share

def start_time(share, schedule="exp"):
    """Inpainting's first time t0, where gamma_t0 = share (Table 4 inverted);
    1 if share >= gamma_1."""
    if share >= emigm.mask_ratio(1.0, schedule).item():
        return 1.0
    if schedule == "linear":
        return share
    if schedule == "cosine":
        return 1 - 2 / math.pi * math.acos(share)
    if schedule == "exp":
        return -math.log1p(-share) / 5
    if schedule == "log":
        return math.expm1(5 * share) / (math.exp(5.0) - 1)
    # poly-0.5
    return share ** 2

def choose_reveal(mask, share, generator=None):
    """mask (B, L) -> reveal (B, L): a uniform n-subset of each row's masked
    positions, n ~ Bin(#masked, share), at least 1, the same n in every row."""
    if share >= 1:
        return mask.clone()
    # n from row 0's masked count (as the official code)
    num_masked = int(mask[0].sum())
    coins = draw(torch.rand, num_masked, generator, mask.device)
    n = max(int((coins < share).sum()), 1)
    # the n masked positions of lowest score (unmasked ones score 2, above every draw)
    scores = draw(torch.rand, mask.shape, generator, mask.device)
    scores = scores.masked_fill(~mask, 2.0)  # (B, L)
    chosen = scores.topk(n, dim=1, largest=False).indices  # (B, n)
    return torch.zeros_like(mask).scatter_(1, chosen, True)

# ==== 2. Classifier-free guidance on a time interval, and NFE (Fig. 3c, Table 2) ====
def cfg_steps(num_iter, cfg, cfg_interval, t0=1.0):
    """(K,) bool: the steps that run the unconditional branch too,
    those with cfg != 1 and t_min < s <= t_max (Fig. 3c)."""
    t_min, t_max = cfg_interval
    times = reveal_schedule(num_iter, t0=t0)[0]  # (K + 1,)
    s = times[1:]  # (K,): each step's next time
    return (s > t_min) & (s <= t_max) & (cfg != 1.0)

def cfg_scale(cfg, cfg_schedule, u):
    """A step's scale 1 + (cfg - 1) f(u), u = the share revealed after it;
    the schedules f are the official code's options."""
    f = dict(constant=1.0, linear=u, power=u ** 2, cubic=u ** 3,
             exp=1 - math.exp(-5 * u), cosine=math.cos(math.pi / 2 * (1 - u)))
    return 1 + (cfg - 1) * f[cfg_schedule]

def nfe(num_iter, cfg, cfg_interval, t0=1.0):
    """Transformer passes per image, NFE = K x f (Table 2), as (K, f):
    f = 1 + the share of steps with CFG."""
    guided = cfg_steps(num_iter, cfg, cfg_interval, t0)  # (K,)
    return num_iter, 1 + guided.float().mean().item()

# (3. The head samplers, DPM-Solver++ and DDPM: head_samplers.py)

# ==== 4. The mask-prediction loop (Sec. 3) ====
@torch.no_grad()
def predict_revealed(model, tokens, mask, reveal, class_emb, *, cfg=1.0, guided=False,
                     head_sampler="dpm-solver", head_steps=8, temperature=1.0,
                     generator=None, noise=None, precision=None):
    """One step of Sec. 3: the transformer on tokens (B, L, C), mask (B, L), class_emb (B, D);
    the head on the tokens of reveal (B, L), from noise (n, C) (None: drawn). precision: the
    transformer's autocast, None: bf16 on GPUs (the official code: fp16), fp32 on CPU.
    -> the new tokens (B, L, C)."""
    B, L, C = tokens.shape
    # CFG with mask (Fig. 2e): [cond; uncond] rows of the same input,
    # the unconditional ones with the fake class embedding
    x = tokens
    m = mask
    r = reveal
    c = class_emb
    if guided:
        fake = model.fake_latent.expand(B, -1).to(class_emb.dtype)
        x = torch.cat([tokens, tokens])  # (2B, L, C)
        m = torch.cat([mask, mask])  # (2B, L)
        r = torch.cat([reveal, reveal])  # (2B, L)
        c = torch.cat([class_emb, fake])  # (2B, D)
    if precision is None:
        precision = "bf16" if x.is_cuda else "fp32"
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    with torch.autocast(x.device.type, dtype, enabled=precision != "fp32"):
        encoded = model.forward_encoder(x, m, c)
        # the head's conditions: only the tokens revealed now (the same count per row)
        z = model.forward_decoder(encoded, m, read=r)  # (B or 2B, n / B, D)
    # row-major as the official z[mask_to_pred]
    z_cond = z[:B].flatten(0, 1).to(tokens.dtype)  # (n, D)
    z_uncond = None
    if guided:
        z_uncond = z[B:].flatten(0, 1).to(tokens.dtype)  # (n, D)
    if noise is None:
        noise = draw(torch.randn, (len(z_cond), C), generator, z.device)
    head_sample = HEAD_SAMPLERS[head_sampler]
    head = head_sample(model.diffloss.net, noise.to(z_cond), z_cond, z_uncond,
                       cfg=cfg, steps=head_steps, temperature=temperature,
                       generator=generator)  # (n, C)
    # tokens[reveal] = head
    return tokens.masked_scatter(reveal[..., None], head.to(tokens.dtype))

@dataclass
class Known:
    """Inpainting's given tokens, kept exactly."""
    tokens: torch.Tensor  # (B, L, C)
    mask: torch.Tensor  # (B, L) bool: True where the token is known

def is_unconditional(model):
    """Trained on the fake class embedding only (labels always dropped)."""
    return model.num_classes == 1 and model.label_drop_prob == 1.0

@torch.no_grad()
def sample_tokens(model, labels=None, num_iter=16, cfg=4.0, cfg_schedule="constant",
                  cfg_interval=(0.1, 0.3), head_sampler="dpm-solver", head_steps=8,
                  temperature=1.0, generator=None, mask_schedule=None, *,
                  num_images=None, known=None, precision=None):
    """labels (B,) -> tokens (B, L, C) in K = num_iter steps (Sec. 3). mask_schedule:
    the gamma_t of the reveals (Fig. 3a), None: the model's. All randomness from `generator`.
    labels None: the official path without classes, num_images (or known's) rows.
    known: kept; the rest is generated on linspace(t0, 1e-5, K + 1),
    t0 = start_time(its share), CFG included."""
    if mask_schedule is None:
        mask_schedule = model.mask_schedule
    L = model.seq_len
    # no known tokens: t0 = 1, every token unknown
    if known is None:
        B = num_images if labels is None else len(labels)
        tokens = torch.zeros(B, L, model.token_channels, device=model.fake_latent.device)
        none_known = torch.zeros(B, L, dtype=torch.bool, device=tokens.device)
        known = Known(tokens, none_known)
    B = len(known.tokens)
    # no labels: the fake class embedding in every row, no CFG (it would mix equal predictions)
    if labels is None:
        class_emb = model.fake_latent.expand(B, -1)
        cfg = 1.0
    else:
        class_emb = model.class_emb(labels)  # (B, D)
    # the unknown tokens start at 0
    tokens = torch.where(known.mask[..., None], known.tokens, 0.0)  # (B, L, C)
    unknown = (~known.mask).sum(1)  # (B,)
    # the MAE encoder keeps the same count in every row: one run per unknown count
    counts = [n for n in unknown.unique().tolist() if n > 0]
    with packed_weights(model):  # each weight in oneDNN's layout once (cli.py)
        for count in counts:
            rows = (unknown == count).nonzero()[:, 0]  # (b,)
            t0 = start_time(count / L, mask_schedule)
            reveal_share = reveal_schedule(num_iter, mask_schedule, t0)[1]  # (K,)
            guided = cfg_steps(num_iter, cfg, cfg_interval, t0).tolist()  # (K,)
            x = tokens[rows]  # (b, L, C)
            rows_emb = class_emb[rows]  # (b, D)
            mask = ~known.mask[rows]  # (b, L): True = not generated yet
            for k in range(num_iter):
                # everything was revealed early (possible, rare)
                if not mask[0].any():
                    break
                share = reveal_share[k].item()
                reveal = choose_reveal(mask, share, generator)  # (b, L)
                scale = cfg
                if cfg_schedule != "constant":
                    # u: the share revealed after this step
                    still_masked = (mask[0].sum() - reveal[0].sum()).item()
                    scale = cfg_scale(cfg, cfg_schedule, 1 - still_masked / L)
                x = predict_revealed(model, x, mask, reveal, rows_emb, cfg=scale,
                                     guided=guided[k], head_sampler=head_sampler,
                                     head_steps=head_steps, temperature=temperature,
                                     generator=generator, precision=precision)  # (b, L, C)
                mask = mask & ~reveal
            tokens[rows] = x
    return tokens

# ==== 5. The paper's sampling settings (Tables 2, 3; official evaluation) ====
# (size, image size) -> K -> sample_tokens' settings;
# "16 x 1.2" in the paper is K = 16 with NFE factor f = 1.2
K16 = dict(head_steps=8, cfg=4.0, cfg_schedule="constant", cfg_interval=(0.1, 0.3))
K128 = dict(head_steps=14, cfg=4.0, cfg_schedule="constant", cfg_interval=(0.18, 0.6))
# 512 px: the official evaluation's intervals
K16_512 = dict(K16, cfg_interval=(0.15, 0.35))
K64_512 = dict(K128, cfg_interval=(0.25, 0.5))
PRESETS = {
    **{(size, 256): {16: K16, 128: K128} for size in ("XS", "S", "L")},
    ("B", 256): {16: K16, 128: dict(K128, cfg_interval=(0.05, 0.4))},
    ("H", 256): {16: dict(K16, cfg_interval=(0.2, 0.4)),
                 128: dict(K128, cfg_interval=(0.3, 0.7))},
    **{(size, 512): {16: K16_512, 64: K64_512} for size in ("XS", "S", "B", "L")},
    # the CPU demo's
    ("Tiny", 28): {16: dict(K16, cfg=3.0, cfg_interval=(0.0, 1.0))},
}
# the config keys that name a preset's architecture
ARCHITECTURE = ("seq_len", "token_channels", "width", "depth", "num_heads",
                "head_depth", "head_width")

def preset_size(config):
    """The (size, image size) of PRESETS with `config`'s architecture, else ("custom", None)."""
    for size, img_size in PRESETS:
        preset = emigm.TINY
        # emigm.SIZES: the transformer, and the head per image size
        if size != "Tiny":
            head_depth, head_width = emigm.SIZES[size]["head"][img_size]
            preset = dict(emigm.SIZES[size], **emigm.TOKENS[img_size],
                          head_depth=head_depth, head_width=head_width)
        if all(config[name] == preset[name] for name in ARCHITECTURE):
            return size, img_size
    return "custom", None

def settings(model, num_iter, head_sampler="dpm-solver", head_steps=None, cfg=None,
             cfg_schedule=None, cfg_interval=None, temperature=1.0, mask_schedule=None,
             precision=None):
    """sample_tokens' keyword arguments: those given, the others (None) from the preset
    of the model's size and K."""
    if head_sampler == "ddpm" and head_steps is None:
        head_steps = 100  # MAR's
    given = dict(head_steps=head_steps, cfg=cfg, cfg_schedule=cfg_schedule,
                 cfg_interval=cfg_interval)
    size = preset_size(model.config)
    preset = PRESETS.get(size, {}).get(num_iter)
    if preset is None and None in given.values():
        raise ValueError(f"--nfe {num_iter}: no preset for K = {num_iter} and this model: "
                         f"pass --head-steps --cfg --cfg-schedule --cfg-interval")
    for name, value in given.items():
        if value is None:
            given[name] = preset[name]
    given["cfg_interval"] = tuple(given["cfg_interval"])
    return dict(num_iter=num_iter, head_sampler=head_sampler, temperature=temperature,
                mask_schedule=mask_schedule, precision=precision, **given)

# ==== Checkpoints, grids and the bulk .npz (DiT's sample.py and sample_ddp.py) ====
# (L, C) of the tokens -> (tokenizer, image pixels)
TOKENIZERS = {(256, 16): ("kl16", 256), (256, 32): ("dcae", 512)}

def load_model(path, size=None, img_size=None, ema=True, device="cpu", tokenizer=None):
    """-> (model, training flags, data): ours built from their 'config', official ones
    from size and img_size."""
    # one-line errors for unreadable files
    checkpoint = checkpoints.load_checkpoint(path)
    config = checkpoint.get("config")
    if config is None and size is None:
        raise ValueError(f"--ckpt {path} has no 'config' (an official one?): pass --size")
    if config is None:
        model = emigm.create_emigm(size, 256 if img_size is None else img_size)
    else:
        model = emigm.EMIGM(**config)
    # train.py's dict(tokenizer, img_size, patch, channels, class_names)
    data = checkpoint.get("data")
    # older checkpoints and runs on random tokens: from the token shape (pixels: 28 x 28 grey)
    if data is None or data["tokenizer"] is None:
        token_shape = (model.seq_len, model.token_channels)
        kind, pixels = TOKENIZERS.get(token_shape, ("pixel", 28))
        patch = 28 // math.isqrt(model.seq_len) if kind == "pixel" else None
        channels = None if patch is None else 1
        data = dict(tokenizer=kind, img_size=pixels, patch=patch,
                    channels=channels, class_names=None)
    # the flags that name the model must agree with the checkpoint's
    own_size = preset_size(model.config)[0]
    naming_flags = (("--size", size, own_size),
                    ("--img-size", img_size, data["img_size"]),
                    ("--tokenizer", tokenizer, data["tokenizer"]))
    for flag, value, own in naming_flags:
        if value is not None and value != own:
            message = f"{flag} {value} disagrees with --ckpt {path} ({own})"
            raise ValueError(f"{message}: drop {flag}")
    try:
        checkpoints.load_weights(model, checkpoint, ema=ema)
    except ValueError as error:
        raise ValueError(f"--ckpt {path}: {error}") from None
    flags = checkpoint.get("args") or {}
    # the official checkpoints pickle an argparse.Namespace
    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    return model.to(device).eval(), flags, data

def generate(model, tok, labels, sampler_kwargs, seed, device, num_images=None, known=None):
    """uint8 images (B, H, W, 3), all from `seed`: MAR's rounding, grey
    repeated to 3 channels for the ADM evaluator. labels None: unconditional,
    num_images (or known's) of them. known: see sample_tokens."""
    generator = torch.Generator(device).manual_seed(seed)
    if labels is not None:
        labels = labels.to(device)
    tokens = sample_tokens(model, labels, generator=generator, num_images=num_images,
                           known=known, **sampler_kwargs)  # (B, L, C)
    with torch.no_grad():
        images = tok.decode(tokens).float()  # (B, 1 or 3, H, W) in [-1, 1]
        images = (images + 1) / 2 * 255
    images = images.clamp(0, 255).round().to(torch.uint8)
    images = images.permute(0, 2, 3, 1)  # (B, H, W, 1 or 3)
    return images.expand(-1, -1, -1, 3).cpu().numpy()

def write_grid(images, path, row_names=None):
    """uint8 (rows, columns, H, W, 3) -> a PNG; row_names: drawn in a white left margin."""
    from PIL import Image, ImageDraw
    rows, columns, H, W, _ = images.shape
    grid = images.swapaxes(1, 2).reshape(rows * H, columns * W, 3)
    picture = Image.fromarray(grid)
    if row_names is not None:
        # PIL's default font, each name at its row's middle
        widths = [ImageDraw.Draw(picture).textlength(n) for n in row_names]
        margin = 8 + math.ceil(max(widths))
        padding = ((0, 0), (margin, 0), (0, 0))
        picture = Image.fromarray(np.pad(grid, padding, constant_values=255))
        for i, name in enumerate(row_names):
            middle = (4, i * H + H // 2)
            ImageDraw.Draw(picture).text(middle, name, fill="black", anchor="lm")
    picture.save(path)

def save_grid(model, tok, classes, per_class, sampler_kwargs, seed, batch_size, path, device,
              row_names=None, unconditional=False):
    """A PNG of per_class images per class (classes None: DiT's 8 on ImageNet, else the
    first <= 16), or per_class rows when unconditional; seeds as bulk's.
    row_names[c]: class c's name, left of its rows."""
    if classes is None:
        first = list(range(min(model.num_classes, 16)))
        classes = list(GRID_CLASSES) if model.num_classes == 1000 else first
    # unconditional: per_class rows of images without labels
    if unconditional:
        classes = [0] * per_class
    labels = torch.tensor(classes).repeat_interleave(per_class)
    start = time.perf_counter()
    batches = []
    for j, rows in enumerate(labels.split(batch_size)):
        batch_labels = None if unconditional else rows
        images = generate(model, tok, batch_labels, sampler_kwargs,
                          batch_seed(seed, j), device, num_images=len(rows))
        batches.append(images)
    images = np.concatenate(batches)  # (N, H, W, 3) uint8
    if row_names is not None and not unconditional:
        row_names = [row_names[c] for c in classes]
    grid = images.reshape(len(classes), per_class, *images.shape[1:])
    write_grid(grid, path, row_names)
    seconds = (time.perf_counter() - start) / len(labels)
    print(f"wrote {path}; {seconds:.3f} s/image (first batch included)")

def bulk(model, tok, sampler_kwargs, num_images, out, seed, batch_size, rank, world_size,
         device, fid_ref=None, inception=None, unconditional=False):
    """OUT/samples.npz: the images and labels i % classes (none when unconditional).
    Batch j goes to rank j % world_size and to its own file: the same bytes on any
    process count; a restart skips the written ones."""
    from tqdm import tqdm
    parts = Path(out) / "batches"
    labels = torch.arange(num_images) % model.num_classes
    batches = labels.split(batch_size)
    # a missing Inception fails now, not after sampling
    if fid_ref not in (None, "fashion-mnist") and rank == 0:
        import fid
        inception = fid.load_inception(inception, device)
    parts.mkdir(parents=True, exist_ok=True)
    # (seconds, images) of each batch sampled here
    times = []
    mine = range(rank, len(batches), world_size)
    for j in tqdm(mine, disable=rank != 0, desc="sampling"):
        if (parts / f"{j:06d}.npy").exists():
            continue
        start = time.perf_counter()
        batch_labels = None if unconditional else batches[j]
        images = generate(model, tok, batch_labels, sampler_kwargs, batch_seed(seed, j),
                          device, num_images=len(batches[j]))
        # complete files only: write, then rename
        np.save(parts / f"tmp{rank}.npy", images)
        os.replace(parts / f"tmp{rank}.npy", parts / f"{j:06d}.npy")
        times.append((time.perf_counter() - start, len(batches[j])))
    if rank == 0 and len(times) > 1:
        seconds, count = np.sum(times[1:], axis=0)
        print(f"{seconds / count:.3f} s/image on rank 0 after a warm-up batch")
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        return
    files = [parts / f"{j:06d}.npy" for j in range(len(batches))]
    arr = np.concatenate([np.load(file) for file in files])
    arrays = {"arr_0": arr}
    if not unconditional:
        arrays["arr_1"] = labels.numpy()
    np.savez(Path(out) / "samples.npz", **arrays)
    shutil.rmtree(parts)
    print(f"wrote {Path(out) / 'samples.npz'}: {arr.shape} uint8")
    # fashion-mnist: our offline metric for 28 x 28 data, not Inception FID
    if fid_ref == "fashion-mnist":
        import small_metric
        import tokenizer
        train_split = tokenizer.load_fashion_mnist("train")
        metric = small_metric.SmallDataMetric(*train_split, str(METRIC_CACHE))
        print(metric.label, metric.evaluate(arr[..., 0], arrays.get("arr_1")))
    elif fid_ref is not None:
        print(fid.compute_metrics(arr, fid_ref, model=inception))

# ==== Command line: a grid for eyes, an ADM .npz for FID (same bytes on any process count)
def check_flags(args):
    """The checks across flags and of the paths, before any checkpoint is read."""
    if args.ckpt is None:
        raise ValueError("--ckpt is missing: pass --ckpt PATH (or --bench)")
    inpainting = (args.inpaint is not None or args.region is not None
                  or args.mask_image is not None)
    if inpainting:
        # its flags and inputs
        import inpaint
        inpaint.check_flags(args)
    else:
        # bulk mode: --num-images and --out together; --fid-ref needs them
        one_of_two = (args.num_images is None) != (args.out is None)
        if one_of_two or (args.fid_ref and args.out is None):
            raise ValueError("--num-images, --out: bulk mode takes both "
                             "(and --fid-ref needs them)")
    interval = args.cfg_interval
    if interval is not None and not interval[0] < interval[1]:
        raise ValueError(f"--cfg-interval {interval}: pass T_MIN < T_MAX")
    ddpm_steps = args.head_steps if args.head_sampler == "ddpm" else None
    if ddpm_steps is not None and not 2 <= ddpm_steps <= 1000:
        raise ValueError(f"--head-steps {ddpm_steps}: DDPM respaces 1000 steps: pass 2 to 1000")
    inputs = {"--fid-ref": args.fid_ref, "--inception": args.inception, "--vae": args.vae}
    for flag, path in inputs.items():
        if path not in (None, "fashion-mnist") and not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist: pass an existing path")
    # the output: --grid a file in an existing folder, --out a folder (made if missing)
    flag = "--grid" if args.out is None else "--out"
    path = Path(args.grid if args.out is None else args.out)
    if path.exists() and path.is_dir() != (flag == "--out"):
        kind = "file name" if flag == "--grid" else "folder"
        raise ValueError(f"{flag} {path}: pass a {kind}")
    folder = path if flag == "--out" else path.parent
    # the nearest existing folder must take it
    while flag == "--out" and not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: {folder} is no folder we can write in: create it")

def run(args):
    """Check every flag, load the model and its tokenizer, then write a grid or a bulk .npz."""
    import tokenizer
    check_flags(args)
    ddp = setup_distributed()
    model, flags, data = load_model(args.ckpt, args.size, args.img_size, ema=not args.no_ema,
                                    device=ddp.device, tokenizer=args.tokenizer)
    unconditional = args.unconditional or is_unconditional(model)
    num_classes = model.num_classes
    if unconditional and args.classes is not None:
        raise ValueError(f"--classes {args.classes[0]}: unconditional sampling: drop --classes")
    if args.classes is not None and max(args.classes) >= num_classes:
        raise ValueError(f"--classes {max(args.classes)}: the model has "
                         f"classes 0-{num_classes - 1}")
    bulk_mode = args.out is not None
    if bulk_mode and not unconditional and args.num_images % num_classes:
        raise ValueError(f"--num-images {args.num_images}: pass a multiple of {num_classes}")
    sampler_kwargs = settings(model, args.num_iter, args.head_sampler,
                              args.head_steps, args.cfg, args.cfg_schedule,
                              args.cfg_interval, args.temperature,
                              args.mask_schedule, args.precision)
    vae = args.vae if args.vae is not None else flags.get("vae")
    tok = tokenizer.load_tokenizer(data["tokenizer"], vae, patch=data["patch"],
                                   img_size=data["img_size"],
                                   in_channels=data["channels"])
    tok = tok.to(ddp.device).eval()
    if args.compile:
        # the weights as constants (inductor's freezing): nothing trains here
        compile_model(model, freezing=True)
    if tok.channels != model.token_channels:
        raise ValueError(f"{tok.kind} tokens: {tok.channels} channels, the "
                         f"model's: {model.token_channels}")
    # no labels: no CFG (sample_tokens' labels=None), also in what is printed
    if unconditional:
        sampler_kwargs["cfg"] = 1.0
    if ddp.rank == 0 and args.inpaint is None:  # inpaint.run prints its own NFE (its t0)
        k, f = nfe(args.num_iter, sampler_kwargs["cfg"], sampler_kwargs["cfg_interval"])
        print(f"NFE = {k} x {f:.4f} (~{k} x {f:.1f}); {sampler_kwargs}")
    if args.inpaint is not None:
        import inpaint
        inpaint.run(args, model, tok, data, sampler_kwargs, unconditional, ddp.device)
    elif args.out is None:
        save_grid(model, tok, args.classes, args.per_class, sampler_kwargs,
                  args.seed, args.batch_size, args.grid, ddp.device,
                  data["class_names"], unconditional)
    else:
        bulk(model, tok, sampler_kwargs, args.num_images, args.out, args.seed,
             args.batch_size, ddp.rank, ddp.world_size, ddp.device,
             args.fid_ref, args.inception, unconditional)
    if ddp.rank == 0:
        where = "allocated on the GPU" if ddp.device.type == "cuda" else "max RSS"
        print(f"peak memory {peak_memory_gb(ddp.device):.2f} GiB ({where})")
    if ddp.world_size > 1:
        dist.destroy_process_group()

def build_parser():
    """The flags; sampler settings left out (None) come from the preset
    of the model's size and K."""
    p = argparse.ArgumentParser(
        description="eMIGM sampling: a grid PNG, an ADM .npz, --bench")
    p.add_argument("--ckpt", help="ours (with a config) or an official one (then --size)")
    p.add_argument("--size", choices=list(emigm.EMIGM_models), help="official checkpoints only")
    p.add_argument("--img-size", type=int, choices=[256, 512], help="official checkpoints only")
    p.add_argument("--nfe", dest="num_iter", type=positive_int, default=16,
                   help="K, the steps ('128 x 1.4' is K = 128). "
                        "Presets: 16, 128; 512 px: 16, 64")
    p.add_argument("--cfg", type=guidance_scale, help=">= 1 (preset: 4.0)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, help="preset: constant")
    p.add_argument("--cfg-interval", type=unit_interval, nargs=2, metavar=("T_MIN", "T_MAX"),
                   help="CFG iff T_MIN < s <= T_MAX, s the step's next time")
    p.add_argument("--mask-schedule", choices=list(emigm.SCHEDULES),
                   help="default: the model's")
    p.add_argument("--head-sampler", default="dpm-solver", choices=list(HEAD_SAMPLERS))
    p.add_argument("--head-steps", type=positive_int, help="presets: 8 (K=16), 14; ddpm: 100")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="ddpm only")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="the transformer's autocast (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the stacks and the head (the first batch compiles)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--tokenizer", choices=["kl16", "dcae", "pixel"],
                   help="default: the model's")
    p.add_argument("--vae", help="kl16.ckpt or the DC-AE diffusers directory")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=32, help="per process")
    p.add_argument("--classes", type=nonnegative_int, nargs="+",
                   help="grid rows (default: DiT's 8)")
    p.add_argument("--per-class", type=positive_int, default=8, help="--inpaint: grid columns")
    p.add_argument("--unconditional", action="store_true", help="no labels, no CFG (any model)")
    p.add_argument("--inpaint",
                   help="images.npz (ADM: arr_0 uint8 (N, H, W, C)) or 'fashion-mnist'")
    p.add_argument("--region",
                   help="--inpaint: bottom (default), top, left, right, center, border")
    p.add_argument("--mask-image", help="--inpaint's unknown area: a PNG's white pixels")
    p.add_argument("--grid", default="samples.png", help="the grid PNG, in an existing folder")
    p.add_argument("--num-images", type=positive_int,
                   help="bulk mode: OUT/samples.npz; --inpaint: N")
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
            # the benchmarks of train.py and sample.py live in bench.py
            import bench
            bench.sampling(args.bench_k, args.bench_batches, args.compile)
        else:
            run(args)
    except (ValueError, FileNotFoundError) as error:
        message = " ".join(str(error).split())
        parser.exit(2, f"{parser.prog}: error: {message}\n")

if __name__ == "__main__":
    main()
