"""Train eMIGM (You et al. 2025, "Effective and Efficient Masked Image Generation Models", arXiv 2503.07197).

One loop for every scale. The defaults are the official recipe (AdamW betas (0.9, 0.95), weight decay 0.02 except on
1-D params, biases and the diffusion head; lr = blr x global batch / 256 with blr 1e-4, 100 warmup epochs then constant;
grad clip 3.0; EMA 0.9999; 64 images per GPU; 800 epochs), and every design choice of the paper's Fig. 2 is a flag.

    torchrun --nproc_per_node 8 train.py --size B --cached-path cache/    # latents cached by `tokenizer.py cache`
    torchrun --nproc_per_node 8 train.py --size B --data-path imagenet/train --vae kl16.ckpt
    python train.py --demo                 # Fashion-MNIST, 2 CPU cores, <= 10 minutes: grid, Frechet distance, accuracy
    python train.py --bench --size XS      # step time, images/s, peak memory, share of the fp32 matmul peak

Exact resume: `--resume out/last.pt` restores weights, EMA, optimizer, step, sampler position and every rank's RNG
state, so N steps straight and N/2 + resume + N/2 give the same parameters (bitwise on CPU).
"""
import argparse
import contextlib
import copy
import itertools
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import emigm
import fid
import sample
import tokenizer

# The Fashion-MNIST demo (issue 6, item 7), tuned to finish in <= 10 minutes on 2 CPU cores: 7x7 pixel patches
# (16 tokens of 49 values: the transformer's cost falls 2.5x against 4x4 patches), no dropout, 4 head copies per
# token (the head is the cheap part here), lr 1e-3 with a cosine decay, EMA 0.995, CFG 3 on every sampling step.
DEMO = dict(dataset="fashion-mnist", size="Tiny", patch=7, head_depth=3, dropout=0.0, diffusion_batch_mul=4,
            global_batch_size=64, blr=4e-3, warmup_epochs=0.05, lr_schedule="cosine", max_steps=1300, ema_decay=0.995,
            sample_every=0, ckpt_every=0, num_iter=16, cfg=3.0, cfg_interval=[0.0, 1.0], results_dir="out/demo")
BENCH_STEPS = 5
EVAL_BATCH = 250  # images per sampling batch in grids and evaluations


def fail(msg):
    """Stop with a one-line error (no traceback): bad paths, sizes and batch sizes are the user's, not bugs."""
    raise SystemExit(f"train.py: error: {msg}")


def create_logger(results_dir, rank):  # rank 0 logs to stdout and results_dir/log.txt; the other ranks are silent
    logger = logging.getLogger("train")
    logger.handlers.clear()
    logger.propagate, logger.level = False, logging.INFO if rank == 0 else logging.CRITICAL + 1
    for h in ((logging.StreamHandler(sys.stdout), logging.FileHandler(Path(results_dir) / "log.txt"))
              if rank == 0 else ()):  # the file is opened on rank 0 only
        h.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
    return logger


# ---- Data: every source yields (x, label) batches plus a function turning x into tokens (B, L, C) on the device
def build_data(args, device):  # -> (dataset or None for random tokens, to_tokens, tokenizer or None)
    if args.dataset == "random":  # benchmark and tests: Gaussian tokens, made once the model's shape is known
        return None, lambda x: x.to(device), None
    if args.dataset == "fashion-mnist":  # pixel tokens: no VAE
        if args.data_path and not os.path.isdir(args.data_path):
            fail(f"--data-path {args.data_path} does not exist (give the folder of the Fashion-MNIST IDX files)")
        images, labels = tokenizer.load_fashion_mnist("train", args.data_path)  # (N, 28, 28) uint8, (N,)
        tok = tokenizer.PixelTokenizer(patch=args.patch, img_size=28, in_channels=1).to(device)
        return TensorDataset(images, labels), lambda x: tok.encode(x.to(device)[:, None].float() / 127.5 - 1), tok
    if args.cached_path:  # latents cached by `tokenizer.py cache`: the dataset draws the flip and the posterior sample
        if not os.path.isdir(args.cached_path):
            fail(f"--cached-path {args.cached_path} does not exist (write it with `python tokenizer.py cache`)")
        ds = tokenizer.CachedLatents(args.cached_path)  # read in this process: its draws use the saved RNG
        if ds.kind != ("dcae" if args.img_size == 512 else "kl16"):
            fail(f"{args.cached_path} holds {ds.kind} latents: pass --img-size {512 if ds.kind == 'dcae' else 256}")
        tok = tokenizer.load_tokenizer(ds.kind, args.vae).to(device).eval() if args.vae else None  # for grids only
        return ds, lambda x: x.to(device), tok
    if not args.data_path or not os.path.isdir(args.data_path):
        fail(f"--data-path {args.data_path} does not exist: give an ImageFolder tree, --cached-path or --dataset")
    if args.img_size != 256:
        fail("ImageFolder training encodes with KL-16 at 256px; at 512px cache DC-AE latents and pass --cached-path")
    if not args.vae or not os.path.isfile(args.vae):
        fail(f"--vae {args.vae} does not exist: ImageFolder training encodes through MAR's kl16.ckpt")
    tok = tokenizer.load_tokenizer("kl16", args.vae).to(device).eval()

    @torch.no_grad()
    def to_tokens(x):  # (B, 3, H, W) in [-1, 1]: random horizontal flip (official augmentation), then the VAE in fp32
        flip = torch.rand(len(x)) < 0.5  # global RNG, saved in checkpoints: a resume replays the same flips
        return tok.encode(torch.where(flip[:, None, None, None], x.flip(-1), x).to(device))  # posterior sample
    return tokenizer.ImageFolder(args.data_path, args.img_size), to_tokens, tok


class ResumableSampler(DistributedSampler):
    """DistributedSampler (same shuffle per epoch on every rank) that can start part-way through an epoch."""
    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)


# ---- Optimisation (official parameter groups, lr schedule) and checkpoints (plain dicts, rank 0, atomic)
def param_groups(model, weight_decay):
    """Official: no decay on 1-D params, biases and the diffusion head; pos-embeds, class_emb, fake_latent decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 or name.endswith(".bias") or "diffloss" in name else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def lr_at(step, steps_per_epoch, total_steps, args):
    """Linear warmup per iteration over warmup_epochs (official: lr x epoch_float / warmup), then constant (official)
    or a cosine decay to 0 (MAR's option; the CPU demo uses it)."""
    epoch = step / steps_per_epoch
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    if args.lr_schedule == "constant":
        return args.lr
    warm = args.warmup_epochs * steps_per_epoch
    progress = (step - warm) / max(total_steps - warm, 1)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def rng_states(world):
    """Every rank's torch RNG states (CPU and, on GPU, CUDA), so that a resume replays the same masks and noise."""
    state = {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    states = [state] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states


def write_checkpoint(names, model, ema, optimizer, step, steps_per_epoch, args, world, rank):
    rng = rng_states(world)  # collective: every rank takes part
    if rank == 0:
        ckpt = dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(), step=step,
                    epoch=step / steps_per_epoch, args=dict(vars(args)), config=model.config, rng=rng)
        for name in names:
            torch.save(ckpt, Path(args.results_dir) / (name + ".tmp"))  # plain data: loads with weights_only=True
            os.replace(Path(args.results_dir) / (name + ".tmp"), Path(args.results_dir) / name)
    dist.is_initialized() and dist.barrier()  # nobody runs ahead (or exits) before the file is complete


def resume(path, model, ema, optimizer):
    """Load weights, EMA and optimizer; the RNG states are restored later, right before the first step."""
    if not os.path.isfile(path):
        fail(f"--resume {path}: no such checkpoint")
    ckpt = emigm.load_checkpoint(path)
    if "config" not in ckpt or "rng" not in ckpt:
        fail(f"--resume {path} is not a checkpoint of train.py (to start from other weights, load them yourself)")
    old = ckpt["config"]
    diff = [f"{k}={old.get(k)} (this run {v})" for k, v in model.config.items() if old.get(k) != v]
    if diff:
        fail(f"--resume {path} was trained with a different model: {', '.join(diff)}")
    for key, obj in (("model", model), ("ema", ema), ("optimizer", optimizer)):
        obj.load_state_dict(ckpt[key])
    return ckpt


# ---- Evaluation through sample.py: a class-conditional grid, and on Fashion-MNIST the small-data metric of fid.py
def evaluate(ema, tok, args, step, device, logger, metric=None):
    """Seeded generators of their own (sample.py's): evaluating never touches the training RNG."""
    if tok is None:
        return logger.info("no decoder for grids: pass --vae") or {}
    kw = dict(num_iter=args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule, head_steps=args.head_steps,
              cfg_interval=tuple(args.cfg_interval))  # DPM-Solver head, as the official evaluation
    path = Path(args.results_dir) / f"grid_{step:07d}.png"
    classes = list(range(ema.num_classes)) if ema.num_classes <= 16 else list(sample.GRID_CLASSES)
    sample.save_grid(ema, tok, classes, args.grid_per_class, kw, args.seed, EVAL_BATCH, str(path), device)
    logger.info(f"step {step}: EMA grid -> {path}")
    result = {"grid": str(path)}
    if metric is not None:
        labels = torch.arange(args.eval_samples) % ema.num_classes  # balanced classes
        images = np.concatenate([sample.generate(ema, tok, lab, kw, sample.batch_seed(args.seed, j), device)
                                 for j, lab in enumerate(labels.split(EVAL_BATCH))])  # (N, H, W, 3) uint8
        result.update(metric.evaluate(images[..., 0], labels.numpy()))
        logger.info(f"step {step}: small-data Frechet distance {result['frechet']:.3f}, conditional accuracy "
                    f"{result['accuracy']:.3f} ({args.eval_samples} EMA samples, K={args.num_iter}, cfg {args.cfg})")
    return result


def report_demo(metric, result, args, seconds, logger):
    """The demo's verdict next to as many real test images as samples (the Frechet distance's bias depends on N)."""
    test = tokenizer.load_fashion_mnist("test", args.data_path)  # (images (N, 28, 28) uint8, labels (N,))
    base = metric.baselines(*(t[:args.eval_samples].numpy() for t in test))
    met = lambda ok: "met" if ok else "MISSED"
    logger.info(f"{metric.label}, {args.eval_samples} images each:\n"
                f"  samples    FD {result['frechet']:8.3f}  conditional accuracy {result['accuracy']:.3f}\n"
                f"  3x3 blur   FD {base['blur3x3']:8.3f}  (real test images through a 3x3 box blur)\n"
                f"  real test  FD {base['real_test']:8.3f}  classifier accuracy {base['classifier_accuracy']:.3f}"
                f" (the ceiling)\n  floor      FD {base['floor']:8.3f}  (test half against test half)\n"
                f"targets: accuracy >= 0.80 {met(result['accuracy'] >= 0.8)}, FD below the blur "
                f"{met(result['frechet'] < base['blur3x3'])}; {seconds / 60:.1f} minutes in all; grid {result['grid']}")


# ---- Training
def build_model(args, tok=None):
    """The --size preset with the flags given on the command line (None = the preset's value, which is official)."""
    names = ("width", "depth", "num_heads", "head_depth", "head_width", "buffer_size", "mask_schedule",
             "loss_weighting", "t_min", "use_mae", "cfg_with_mask", "label_drop_prob", "diffusion_batch_mul")
    over = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.dropout is not None:
        over.update(attn_dropout=args.dropout, proj_dropout=args.dropout)
    if tok is not None and args.dataset == "fashion-mnist":  # pixel tokens of 28x28 images, 10 classes
        over.update(seq_len=tok.seq_len(28), token_channels=tok.channels, num_classes=10)
    try:
        return emigm.EMIGM_models[args.size](img_size=args.img_size, **over)
    except ValueError as e:
        fail(str(e))


def build_training(args, device, tok=None):
    """-> (model, EMA copy (no gradients, always in eval mode), AdamW with the official groups and betas)."""
    model = build_model(args, tok).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    return model, ema, torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))


def main(args):
    start_time, world = time.time(), int(os.environ.get("WORLD_SIZE", 1))
    args.global_batch_size = args.global_batch_size or 64 * world  # default: 64 images per GPU (official B/L/H)
    if args.global_batch_size % world:
        fail(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} processes")
    ddp = sample.setup_distributed()
    rank, world, device = ddp.rank, ddp.world_size, ddp.device
    local_bs, args.lr = args.global_batch_size // world, args.lr or args.blr * args.global_batch_size / 256  # official
    os.makedirs(args.results_dir, exist_ok=True)  # every rank: exist_ok makes it safe, and no rank waits
    logger = create_logger(args.results_dir, rank)
    try:
        ds, to_tokens, tok = build_data(args, device)
    except (FileNotFoundError, ValueError) as e:  # tokenizer.py's messages are one line and say what to do
        fail(e)
    torch.manual_seed(args.seed)  # the same initial weights on every rank, whatever the world size
    model, ema, optimizer = build_training(args, device, tok)
    if ds is None:  # --dataset random: Gaussian tokens and labels (benchmark, tests)
        g, n = torch.Generator().manual_seed(args.seed), max(4 * args.global_batch_size, 256)
        ds = TensorDataset(torch.randn(n, model.seq_len, model.token_channels, generator=g),
                           torch.randint(model.num_classes, (n,), generator=g))
    sampler = ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(ds, batch_size=local_bs, sampler=sampler, drop_last=True, pin_memory=device.type == "cuda",
                        num_workers=args.num_workers if args.dataset == "imagefolder" else 0,  # in-memory / mmap: 0
                        generator=torch.Generator())  # its own: making an iterator leaves the global RNG alone
    steps_per_epoch = len(sampler) // local_bs
    if steps_per_epoch == 0:
        fail(f"{len(ds)} training examples cannot fill one global batch of {args.global_batch_size}")
    total = args.max_steps or args.epochs * steps_per_epoch
    ckpt = resume(args.resume, model, ema, optimizer) if args.resume else {}
    step = ckpt.get("step", 0)
    train_model = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    logger.info(f"eMIGM-{args.size}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(ds):,} examples, "
                f"{world} process(es) on {device}, global batch {args.global_batch_size}, lr {args.lr:.3g}, "
                f"{total} steps ({steps_per_epoch} per epoch), starting at step {step}")
    torch.manual_seed(args.seed + rank)  # per-rank streams for masks, noise, dropout and label drop (official)
    if ckpt and len(ckpt["rng"]) == world:  # every rank continues its own random stream
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if "cuda" in ckpt["rng"][rank] and device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
    elif ckpt:
        logger.info(f"warning: checkpoint of {len(ckpt['rng'])} processes, now {world}: new random streams")
    csv_path, metric, result = Path(args.results_dir) / "log.csv", None, {}
    if rank == 0 and not csv_path.exists():
        csv_path.write_text("step,epoch,loss,lr,grad_norm,images_per_s,peak_mem_gb,cpu_s\n")
    model.train()
    train_step, sums, t_log, log_steps = make_train_step(train_model, ema, optimizer, args), [0.0, 0.0], time.time(), 0
    pbar = tqdm(total=total, initial=step, disable=rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True)
    while step < total:
        sampler.set_epoch(step // steps_per_epoch)  # the same shuffle for a given epoch, straight or resumed
        sampler.start = (step % steps_per_epoch) * local_bs  # a resume continues mid-epoch where the run stopped
        for x, labels in itertools.islice(loader, total - step):
            lr = lr_at(step, steps_per_epoch, total, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = [a + b for a, b in zip(sums, train_step(to_tokens(x), labels.to(device), step))]
            step, log_steps = step + 1, log_steps + 1
            pbar.update(1)
            if step % args.log_every == 0 or step == total:  # mean loss and grad norm over the steps and the ranks
                stats = torch.tensor(sums, dtype=torch.float64, device=device)  # NCCL reduces GPU tensors
                if world > 1:
                    dist.all_reduce(stats)
                loss_mean, norm_mean = (stats.cpu() / (world * log_steps)).tolist()
                row = [step, step / steps_per_epoch, loss_mean, lr, norm_mean,
                       log_steps * args.global_batch_size / (time.time() - t_log), sample.peak_memory_gb(device),
                       time.process_time()]
                logger.info("step {} epoch {:.2f} loss {:.4f} lr {:.3g} grad norm {:.3f} {:.1f} img/s peak mem "
                            "{:.2f} GB cpu {:.0f} s".format(*row))
                if rank == 0:
                    with open(csv_path, "a") as f:
                        f.write(",".join(f"{v:.6g}" for v in row) + "\n")
                sums, t_log, log_steps = [0.0, 0.0], time.time(), 0
            names = ["last.pt"] * (step % args.save_every == 0 or step == total)
            names += [f"ckpt_{step:07d}.pt"] * (args.ckpt_every > 0 and step % args.ckpt_every == 0)
            if names:
                write_checkpoint(names, model, ema, optimizer, step, steps_per_epoch, args, world, rank)
            if step == total or (args.sample_every and step % args.sample_every == 0):
                if rank == 0:
                    if args.dataset == "fashion-mnist" and (step == total or args.periodic_metric):  # train split
                        metric = metric or fid.SmallDataMetric(*(t.numpy() for t in ds.tensors), args.metric_cache)
                    result = evaluate(ema, tok, args, step, device, logger, metric)
                dist.is_initialized() and dist.barrier()
                t_log = time.time()
    pbar.close()
    if rank == 0 and "accuracy" in result:
        report_demo(metric, result, args, time.time() - start_time, logger)
    dist.is_initialized() and dist.barrier()
    return model, ema


def make_train_step(train_model, ema, optimizer, args):  # the parameter lists and the autocast choice made once
    params, ema_params = list(train_model.parameters()), list(ema.parameters())  # DDP: its module's, in order
    cuda_bf16 = params[0].device.type == "cuda" and not args.fp32  # fp32 on CPU (emigm.py keeps the head's math fp32)

    def train_step(tokens, labels, step):  # tokens (B, L, C), labels (B,) -> (loss, grad norm)
        with torch.autocast("cuda", torch.bfloat16) if cuda_bf16 else contextlib.nullcontext():
            loss = train_model(tokens, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)  # the global L2 norm (DDP: of all ranks)
        loss_v, norm_v = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()
        if not (math.isfinite(loss_v) and math.isfinite(norm_v)):  # stop before the update spoils the weights
            fail(f"non-finite loss {loss_v} (grad norm {norm_v}) at step {step + 1}: stopped before the update; "
                 f"lower the lr (a resume from {Path(args.results_dir) / 'last.pt'} continues the run)")
        optimizer.step()
        with torch.no_grad():  # ema = decay * ema + (1 - decay) * p every step, from the initial weights (official)
            torch._foreach_mul_(ema_params, args.ema_decay)
            torch._foreach_add_(ema_params, params, alpha=1 - args.ema_decay)
        return loss_v, norm_v
    return train_step


def bench(args):
    """--bench: training steps (forward, backward, clip, AdamW, EMA) of --size on random tokens of the 256px shapes;
    FLOPs counted by torch's FlopCounterMode on the same steps (same seed), the peak timed on 2048^3 matmuls."""
    from torch.utils import flop_counter as fc
    with contextlib.suppress(Exception):  # count CPU flash attention as torch counts the GPU kernels
        fc.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)(
            lambda q, k, v, *a, **kw: fc.sdpa_flop_count(q, k, v))
        fc.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)(
            lambda g, q, k, v, *a, **kw: fc.sdpa_backward_flop_count(g, q, k, v))
    device = sample.setup_distributed().device
    torch.manual_seed(args.seed)
    args.lr, B = args.lr or 1e-4, args.global_batch_size or 8
    model, ema, opt = build_training(args, device)
    x = torch.randn(B, model.seq_len, model.token_channels, device=device)
    y = torch.arange(B, device=device) % model.num_classes
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed(fn):
        t = time.perf_counter()
        fn(), sync()
        return time.perf_counter() - t

    train_step = make_train_step(model, ema, opt, args)
    step = lambda: train_step(x, y, 0)  # exactly the training loop's step
    step(), step()  # warm-up
    torch.manual_seed(args.seed)
    t = sorted(timed(step) for _ in range(BENCH_STEPS))[BENCH_STEPS // 2]
    torch.manual_seed(args.seed)  # the same masks, so the same shapes, as the timed steps
    with fc.FlopCounterMode(display=False) as counter:
        [step() for _ in range(BENCH_STEPS)]
    peak = sample.matmul_peak_flops(device)
    achieved = counter.get_total_flops() / BENCH_STEPS / t
    print(f"eMIGM-{args.size}, {model.seq_len} tokens x {model.token_channels} ch, batch {B}, {device}, "
          f"{torch.get_num_threads()} threads: step {t:.3f} s (median of {BENCH_STEPS}), {B / t:.1f} images/s, "
          f"peak memory {sample.peak_memory_gb(device):.2f} GB, {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of the "
          f"fp32 matmul peak ({peak / 1e9:.1f} GFLOP/s, 2048^3 in this process)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", action="store_true", help="the Fashion-MNIST CPU demo: " + str(DEMO))
    p.add_argument("--bench", action="store_true", help="time a training step on random data (batch 8)")
    p.add_argument("--size", default="B", choices=list(emigm.EMIGM_models))
    p.add_argument("--img-size", type=int, default=256, choices=[256, 512])
    # data
    p.add_argument("--dataset", default="imagefolder", choices=["imagefolder", "fashion-mnist", "random"])
    p.add_argument("--data-path", help="ImageFolder root, or the Fashion-MNIST IDX folder (default: the system's)")
    p.add_argument("--cached-path", help="latent shards written by `tokenizer.py cache` (instead of --data-path)")
    p.add_argument("--vae", help="kl16.ckpt: encodes --data-path images, decodes grids")
    p.add_argument("--patch", type=int, default=4, help="pixel patch of the Fashion-MNIST tokens (28 = 7 x 4)")
    p.add_argument("--num-workers", type=int, default=8, help="ImageFolder decoding workers")
    # the official recipe
    p.add_argument("--epochs", type=int, default=800)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--global-batch-size", type=int, help="default: 64 per process")
    p.add_argument("--blr", type=float, default=1e-4, help="lr = blr x global batch / 256")
    p.add_argument("--lr", type=float, help="absolute lr (overrides --blr)")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup-epochs", type=float, default=100)
    p.add_argument("--weight-decay", type=float, default=0.02)
    p.add_argument("--grad-clip", type=float, default=3.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--seed", type=int, default=1, help="rank r uses seed + r (official)")
    # the model: None = the preset's value; the preset defaults are the paper's (Fig. 2 choices marked)
    p.add_argument("--mask-schedule", choices=list(emigm.SCHEDULES), help="Fig. 2a (paper: exp)")
    p.add_argument("--loss-weighting", choices=list(emigm.WEIGHTINGS), help="Fig. 2b (paper: constant)")
    p.add_argument("--mae", dest="use_mae", action=argparse.BooleanOptionalAction, help="Fig. 2c (paper: on)")
    p.add_argument("--t-min", type=float, help="Fig. 2d: time truncation (paper: 0.2)")
    p.add_argument("--cfg-with-mask", action=argparse.BooleanOptionalAction, help="Fig. 2e (paper: on)")
    p.add_argument("--diffusion-batch-mul", type=int, help="head copies per token (paper: 4)")
    p.add_argument("--label-drop-prob", type=float, help="CFG training (paper: 0.1)")
    p.add_argument("--dropout", type=float, help="attention and projection dropout (paper: 0.1)")
    for name in ("width", "depth", "num-heads", "head-depth", "head-width", "buffer-size"):
        p.add_argument(f"--{name}", type=int, help="override the preset")
    # logging, checkpoints, evaluation
    p.add_argument("--results-dir", default="results")
    p.add_argument("--resume", help="a last.pt / ckpt_*.pt of this run")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=1000, help="steps between rolling last.pt writes")
    p.add_argument("--ckpt-every", type=int, default=50000, help="steps between numbered checkpoints (0: none)")
    p.add_argument("--sample-every", type=int, default=10000, help="steps between EMA grids (0: at the end only)")
    p.add_argument("--periodic-metric", action="store_true", help="Fashion-MNIST: the metric with every grid")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--metric-cache", default=str(sample.METRIC_CACHE), help="the small-data metric's classifier")
    p.add_argument("--grid-per-class", type=int, default=8)
    p.add_argument("--num-iter", type=int, default=16, help="sampling steps K")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--cfg-schedule", default="constant")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=[0.1, 0.3], metavar=("T_MIN", "T_MAX"))
    p.add_argument("--head-steps", type=int, default=8)
    if "--demo" in (sys.argv[1:] if argv is None else argv):  # the demo's values become the defaults; flags win
        p.set_defaults(**DEMO)
    args = p.parse_args(argv)
    args.dataset = "cached" if args.cached_path else args.dataset  # --cached-path wins over --dataset
    return args


if __name__ == "__main__":
    args = parse_args()
    bench(args) if args.bench else main(args)
