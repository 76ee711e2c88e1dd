"""Train eMIGM (You et al. 2025, "Effective and Efficient Masked Image Generation Models").

One loop for every scale, laid out as DiT's train.py. The defaults are the official
recipe (Sec. 5, the official scripts): AdamW, betas (0.9, 0.95), weight decay 0.02;
lr = 1e-4 x batch / 256, 100 warmup epochs, then constant; clipping at 3.0; EMA 0.9999;
800 epochs; 32 images per GPU for XS and S, 64 for B, L and H. Fig. 2's choices are
flags. One run per --results-dir; --resume DIR/last.pt continues it exactly.

    torchrun --nproc_per_node 8 train.py --size B --cached-path cache/
    torchrun --nproc_per_node 8 train.py --size B --data-path imagenet/ --vae kl16.ckpt
    python train.py --demo             # Fashion-MNIST on 2 CPU cores, <= 10 minutes
    python train.py --bench --size XS  # step time, images/s, memory, share of the peak
"""
import argparse
import copy
import itertools
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import checkpoints
import cli
import data
import emigm
import sample
import small_metric
import tokenizer
from cli import guidance_scale, nonnegative_float, nonnegative_int, positive_float, positive_int
from cli import unit_interval

# The official batch per GPU (the scripts' --batch_size, on 32 GPUs).
BATCH_PER_GPU = {"XS": 32, "S": 32, "B": 64, "L": 64, "H": 64, "Tiny": 64}
# The Fashion-MNIST demo, <= 10 minutes on 2 CPU cores: 7x7 pixel patches (16 tokens), no
# dropout, lr 1e-3 with a cosine decay, 1600 steps, EMA 0.99, K = 8, CFG 3 at every step.
DEMO = dict(
    dataset="fashion-mnist", size="Tiny", patch=7, head_depth=3, dropout=0.0,
    diffusion_batch_mul=4, global_batch_size=64, blr=4e-3, warmup_epochs=0.05,
    lr_schedule="cosine", max_steps=1600, ema_decay=0.99, sample_every=0,
    ckpt_every=0, num_iter=8, cfg=3.0, cfg_interval=[0.0, 1.0], results_dir="out/demo",
)
# Own small images (--data-path DIR, no --vae; data.py): the earlier demo's recipe; flags win.
SMALL = dict(
    size="Tiny", img_size=None, patch=None, dropout=0.0, global_batch_size=64, blr=4e-3,
    warmup_epochs=0.05, lr_schedule="cosine", max_steps=1300, ema_decay=0.995,
    sample_every=0, ckpt_every=0, num_iter=16, cfg=3.0, cfg_interval=[0.0, 1.0],
)
# EMIGM's arguments that flags override (None: the preset's value, the paper's).
MODEL_FLAGS = ("width", "depth", "num_heads", "head_depth", "head_width", "buffer_size",
               "mask_schedule", "loss_weighting", "t_min", "use_mae", "cfg_with_mask",
               "label_drop_prob", "diffusion_batch_mul")
RUN_FILES = ("last.pt", "log.csv", "log.txt")  # and ckpt_*, grid_*: a run's files
CSV_HEADER = "step,epoch,loss,lr,grad_norm,images_per_s,peak_mem_gb,cpu_s\n"
EVAL_BATCH = 250  # images per sampling batch in grids and evaluations

# ---- The model, its optimiser and one training step (Sec. 3 and 5) ----
def build_model(size, img_size=256, overrides=None, device="cpu"):
    """eMIGM-{size} (Table 2), drawn on the CPU: the same weights anywhere."""
    model = emigm.EMIGM_models[size](img_size=img_size, **(overrides or {}))
    return model.to(device)

def param_groups(model, weight_decay):
    """Official: no decay on 1-D params (norms), biases and the diffusion head."""
    decay = []
    no_decay = []
    for name, param in model.named_parameters():
        if param.ndim == 1 or name.endswith(".bias") or "diffloss" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0)]

def lr_at(step, lr, warmup_steps, total_steps, schedule="constant"):
    """Linear warmup per step, then constant (official) or cosine (MAR's)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))

def checkpoint_blocks(model):
    """--grad-checkpointing (official): each block recomputes its activations in
    backward, from its forward's RNG state (same dropout); the same state_dict keys."""
    for block in [*model.encoder_blocks, *model.decoder_blocks]:
        # the instance's attribute wins over Block.forward
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)

class Training:
    """The model, its EMA copy (DiT) and AdamW; step() is one step of the recipe."""

    def __init__(self, model, lr, weight_decay, grad_clip=3.0, ema_decay=0.9999,
                 precision="fp32", ddp=False, accum_steps=1, grad_checkpointing=False, compile=False):
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()  # from the init
        groups = param_groups(model, weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
        self.train_model = model  # or its DistributedDataParallel wrapper
        device = next(model.parameters()).device
        if ddp:
            self.train_model = DDP(model, device_ids=[device] if device.type == "cuda" else None)
        if grad_checkpointing:  # after the EMA copy
            checkpoint_blocks(model)
        if compile:  # the stacks and the head; compiled at their first call
            cli.compile_model(model)
        self.params = list(model.parameters())
        self.ema_params = list(self.ema.parameters())
        self.max_norm = grad_clip if grad_clip > 0 else math.inf  # 0: no clipping
        self.ema_decay = ema_decay
        self.accum_steps = accum_steps
        # one autocast context (nanoGPT); fp16: GradScaler (official)
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        self.autocast = torch.autocast(device.type, dtype, enabled=precision != "fp32")
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(self, tokens, labels, step=0):
        """tokens (B, L, C), labels (B,) -> dict(loss=, grad_norm=, skipped=)"""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(tokens, labels)
        self.scaler.unscale_(self.optimizer)  # fp16: clip true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        stats = torch.stack([loss.float(), grad_norm.float()]).tolist()
        # fp16: inf/nan gradients skip the update, halve the loss scale
        skipped = self.scaler.is_enabled() and not math.isfinite(stats[1])
        if not math.isfinite(stats[0]) or not (math.isfinite(stats[1]) or skipped):
            raise ValueError(f"non-finite loss {stats[0]} at step {step + 1}: stopped "
                             f"before the update; lower --lr or --blr")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():  # ema = decay x ema + (1 - decay) x weights
            torch._foreach_mul_(self.ema_params, self.ema_decay)
            torch._foreach_add_(self.ema_params, self.params, alpha=1 - self.ema_decay)
        return dict(loss=stats[0], grad_norm=stats[1], skipped=skipped)

    def forward_backward(self, tokens, labels, mask=None, t=None):
        """The loss (Sec. 3) and its gradients in accum_steps micro-batches -> loss.
        One mask and t for the batch, as EMIGM.forward draws them (one t per batch);
        the dropouts and the head draw per micro-batch."""
        B, L, C = tokens.shape
        size = B // self.accum_steps
        m = self.model
        device = tokens.device
        if mask is None and size < B and m.per_row_masking:
            mask, t = emigm.sample_mask_per_row(B, L, m.mask_schedule, device=device)
        elif mask is None and size < B:
            mask, t = emigm.sample_mask(B, L, m.mask_schedule, m.t_min, device=device)
        loss = 0
        for start in range(0, B, size):
            rows = slice(start, start + size)
            fixed = {}  # the model draws them
            share = 1.0
            if mask is not None:
                row_t = t[rows] if torch.is_tensor(t) else t  # per row: (B,)
                fixed = dict(mask=mask[rows], t=row_t)
                # a mean over its masked tokens times their share: the batch's
                # mean, also if rows mask different counts (per-row masking)
                share = int(mask[rows].sum()) / max(int(mask.sum()), 1)
            # DDP: all-reduce in the last backward only
            inner = start + size < B and isinstance(self.train_model, DDP)
            with self.train_model.no_sync() if inner else nullcontext():
                with self.autocast:
                    micro = self.train_model(tokens[rows], labels[rows], **fixed)
                self.scaler.scale(micro * share).backward()
            loss = loss + share * micro.detach()
        return loss

    def load_state_dict(self, checkpoint):  # weights, EMA and AdamW of a checkpoint
        self.model.load_state_dict(checkpoint["model"])
        self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):  # fp16's loss scale ({}: not fp16)
            self.scaler.load_state_dict(checkpoint["scaler"])

# ---- Evaluation with sample.py: a grid and the small-data metric ----
def evaluate(ema, tok, sampler_kwargs, grid_path, seed, per_class=8, metric=None,
             num_samples=1000, log=print, class_names=None):
    """The EMA model's grid (rows: class_names) and, given a small_metric.SmallDataMetric, its
    value on balanced classes -> dict(grid=path, frechet=, ...); unconditional models: sample.py's
    labels=None path. Not the training RNG."""
    device = next(ema.parameters()).device
    unconditional = sample.is_unconditional(ema)
    sample.save_grid(ema, tok, None, per_class, sampler_kwargs, seed, EVAL_BATCH,
                     str(grid_path), device, class_names, unconditional)
    log(f"EMA grid -> {grid_path}")
    result = {"grid": str(grid_path)}
    if metric is None:
        return result
    labels = torch.arange(num_samples) % ema.num_classes  # balanced classes
    batches = []
    for j, batch_labels in enumerate(labels.split(EVAL_BATCH)):
        batch_seed = cli.batch_seed(seed, j)
        count = len(batch_labels)
        if unconditional:  # no labels, no CFG (the official labels=None)
            batch_labels = None
        images = sample.generate(ema, tok, batch_labels, sampler_kwargs, batch_seed, device,
                                 num_images=count)
        batches.append(images)
    images = np.concatenate(batches)  # (N, H, W, 3) uint8
    if tok.in_channels == 1:  # grey, as the data
        images = images[..., 0]
    result.update(metric.evaluate(images, None if unconditional else labels.numpy()))
    accuracy = ""
    if "accuracy" in result:
        accuracy = f", conditional accuracy {result['accuracy']:.3f}"
    log(f"small-data Frechet distance {result['frechet']:.3f}{accuracy} "
        f"({num_samples} EMA samples)")
    return result

def report_demo(metric, result, data_path, num_samples, seconds, logger):
    """The demo's verdict beside as many real test images (FD's bias depends on N)."""
    images, labels = tokenizer.load_fashion_mnist("test", data_path)
    base = metric.baselines(images[:num_samples].numpy(), labels[:num_samples].numpy())
    verdict = {True: "met", False: "MISSED"}
    logger.info(
        f"{metric.label}, {num_samples} images each:\n"
        f"  samples    FD {result['frechet']:8.3f}  conditional accuracy "
        f"{result['accuracy']:.3f}\n"
        f"  3x3 blur   FD {base['blur3x3']:8.3f}  (real test images, 3x3 box blur)\n"
        f"  2x2 blur   FD {base['blur2x2']:8.3f}  (real test images, 2x2 box blur)\n"
        f"  real test  FD {base['real_test']:8.3f}  classifier accuracy "
        f"{base['classifier_accuracy']:.3f} (the ceiling)\n"
        f"  floor      FD {base['floor']:8.3f}  (test half against test half)\n"
        f"targets: accuracy >= 0.80 {verdict[result['accuracy'] >= 0.8]}, FD below the "
        f"blur {verdict[result['frechet'] < base['blur3x3']]}; stretch: accuracy >= 0.88 "
        f"{verdict[result['accuracy'] >= 0.88]}, FD below the 2x2 blur "
        f"{verdict[result['frechet'] < base['blur2x2']]}; {seconds / 60:.1f} "
        f"minutes in all; grid {result['grid']}")

# ---- Checkpoints (plain dicts, by rank 0), resume, the log ----
def save_checkpoint(name, training, step, epoch, args, ddp, data_entry=None):
    rng = {"cpu": torch.get_rng_state()}  # every rank's: resumes replay the masks
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rng_states = [rng] * ddp.world_size
    if ddp.world_size > 1:
        dist.all_gather_object(rng_states, rng)  # collective: every rank takes part
    if ddp.rank == 0:
        checkpoint = dict(model=training.model.state_dict(), ema=training.ema.state_dict(),
                          optimizer=training.optimizer.state_dict(), step=step,
                          scaler=training.scaler.state_dict(),
                          epoch=epoch, args=vars(args), config=training.model.config,
                          rng=rng_states, data=data_entry)  # plain: loads weights_only
        temporary = Path(args.results_dir) / (name + ".tmp")
        torch.save(checkpoint, temporary)
        os.replace(temporary, Path(args.results_dir) / name)  # never half-written
    if dist.is_initialized():
        dist.barrier()  # no rank runs ahead (or exits) before the file is done

def read_resume(path, config):
    """The --resume checkpoint, checked against `config`, the model of the flags."""
    try:
        checkpoint = checkpoints.load_checkpoint(path)
    except (ValueError, FileNotFoundError) as error:  # missing or corrupt
        raise ValueError(f"--resume: {error}") from None
    if not {"config", "rng", "optimizer", "step"} <= set(checkpoint):
        raise ValueError(f"--resume {path} is not a checkpoint of train.py")
    saved = checkpoint["config"]
    diff = [f"{key}={saved.get(key)} (this run {value})"
            for key, value in config.items() if saved.get(key) != value]
    if diff:
        raise ValueError(f"--resume {path} holds another model: {', '.join(diff)}. "
                         f"It wins: pass the model flags of its run")
    return checkpoint

def restore_rng(rng_states, ddp, logger):
    """This rank's random streams, saved by every rank of the run resumed."""
    if len(rng_states) != ddp.world_size:
        logger.info(f"{len(rng_states)} processes before: new random streams")
        return
    torch.set_rng_state(rng_states[ddp.rank]["cpu"])
    if "cuda" in rng_states[ddp.rank] and ddp.device.type == "cuda":
        torch.cuda.set_rng_state(rng_states[ddp.rank]["cuda"])

def create_logger(results_dir, rank):
    """DiT's: rank 0 logs to stdout and log.txt; the other ranks are silent."""
    logger = logging.getLogger("train")
    for handler in logger.handlers:  # of an earlier run in this process
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.CRITICAL + 1)
    if rank == 0:
        for handler in (logging.StreamHandler(sys.stdout),
                        logging.FileHandler(Path(results_dir) / "log.txt")):
            handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
    return logger

def log_progress(sums, seconds, step, epoch, lr, args, ddp, logger):
    """sums: this rank's loss sum, grad-norm sum, steps; logs means over ranks."""
    sums = sums.to(ddp.device)  # NCCL reduces GPU tensors
    if ddp.world_size > 1:
        dist.all_reduce(sums)
    loss, grad_norm, steps = (sums.cpu() / ddp.world_size).tolist()
    row = [step, epoch, loss / steps, lr, grad_norm / steps,
           steps * args.global_batch_size / seconds, cli.peak_memory_gb(ddp.device),
           time.process_time()]
    logger.info("step {} epoch {:.2f} loss {:.4f} lr {:.3g} grad norm {:.3f} {:.1f} img/s "
                "peak mem {:.2f} GB cpu {:.0f} s".format(*row))
    csv_path = Path(args.results_dir) / "log.csv"
    if ddp.rank == 0:
        if not csv_path.exists():
            csv_path.write_text(CSV_HEADER)
        with open(csv_path, "a") as f:
            f.write(",".join(f"{v:.6g}" for v in row) + "\n")

# ---- The training run ----
def train_loop(args, training, data, loader, ddp, logger, metric, step, total_steps):
    """Steps `step` to total_steps: lr, logs, checkpoints, grids, metric."""
    steps_per_epoch = len(loader)
    warmup_steps = args.warmup_epochs * steps_per_epoch
    # the DPM-Solver head for grids and metrics, as the official evaluation
    sampler_kwargs = dict(num_iter=args.num_iter, cfg=args.cfg, head_steps=args.head_steps,
                          cfg_schedule=args.cfg_schedule, cfg_interval=tuple(args.cfg_interval))
    sums = torch.zeros(3, dtype=torch.float64)  # since the last log
    first_step = step
    start = time.time()
    result = {}
    bar = tqdm(total=total_steps, initial=step, disable=ddp.rank > 0 or not sys.stderr.isatty())
    while step < total_steps:
        loader.sampler.set_epoch(step // steps_per_epoch)  # a shuffle per epoch
        loader.sampler.start = (step % steps_per_epoch) * loader.batch_size  # resumed
        for x, labels in itertools.islice(loader, total_steps - step):
            lr = lr_at(step, args.lr, warmup_steps, total_steps, args.lr_schedule)
            for group in training.optimizer.param_groups:
                group["lr"] = lr
            tokens = data.to_tokens(x, ddp.device)  # (B, L, C)
            stats = training.step(tokens, labels.to(ddp.device), step)
            if stats["skipped"]:  # fp16 overflow: grad norm 0 in the mean
                logger.info(f"step {step + 1}: fp16 overflow, update skipped")
                stats["grad_norm"] = 0.0
            sums += torch.tensor([stats["loss"], stats["grad_norm"], 1], dtype=torch.float64)
            step += 1
            if args.compile and step == first_step + 1:  # compiled: not a step's time nor logged
                logger.info(f"torch.compile: the first step took {time.time() - start:.1f} s")
                sums.zero_()
                start = time.time()
            bar.update(1)
            epoch = step / steps_per_epoch
            last = step == total_steps
            if (step % args.log_every == 0 or last) and sums[2] > 0:
                log_progress(sums, time.time() - start, step, epoch, lr, args, ddp, logger)
                sums.zero_()
                start = time.time()
            if step % args.save_every == 0 or last:
                save_checkpoint("last.pt", training, step, epoch, args, ddp, data.entry)
            if args.ckpt_every > 0 and step % args.ckpt_every == 0:
                save_checkpoint(f"ckpt_{step:07d}.pt", training, step, epoch, args, ddp,
                                data.entry)
            if last or (args.sample_every > 0 and step % args.sample_every == 0):
                if ddp.rank == 0 and data.tokenizer is not None:
                    grid_path = Path(args.results_dir) / f"grid_{step:07d}.png"
                    step_metric = metric if last or args.periodic_metric else None
                    result = evaluate(training.ema, data.tokenizer, sampler_kwargs, grid_path,
                                      args.seed, args.grid_per_class, step_metric,
                                      args.eval_samples, logger.info,
                                      data.entry["class_names"])
                if dist.is_initialized():
                    dist.barrier()
                start = time.time()  # evaluating is not training
    bar.close()
    return result

def run(args):
    """Train as the flags say: DiT's main, distribution optional. -> Training."""
    start_time = time.time()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    # Check the flags together, the data, the files and the checkpoint before any work:
    args = check_args(args, world_size)
    spec = data.describe(args)  # what the data is: kind, tokens, classes
    if spec.kind == "pixels":  # own images: their own size unless given
        args.img_size = spec.img_size
    overrides = model_overrides(args, spec)
    config = model_config(args.size, args.img_size, overrides)
    checkpoint = None
    if args.resume is not None:
        checkpoint = read_resume(args.resume, config)
        data.check_resume(checkpoint.get("data"), spec, args.resume)

    # Setup DDP:
    ddp = cli.setup_distributed()

    # Create model: the same initial weights on every rank, whatever the world size
    torch.manual_seed(args.seed)
    model = build_model(args.size, args.img_size, overrides, ddp.device)
    training = Training(model, args.lr, args.weight_decay, args.grad_clip, args.ema_decay,
                        args.precision, ddp.world_size > 1, args.accum_steps,
                        args.grad_checkpointing, args.compile)

    # Setup data (sets in memory or memory-mapped load in the main process):
    train_data = data.build_data(args, spec, model, ddp.device)
    num_workers = args.num_workers if train_data.kind == "imagefolder" else 0
    batch_size = args.global_batch_size // ddp.world_size
    loader = data.make_loader(train_data.dataset, batch_size, ddp, args.seed, num_workers)
    total_steps = args.max_steps
    if total_steps is None:
        total_steps = args.epochs * len(loader)
    metric = None
    labelled = train_data.labelled  # labelled small images: the small-data metric
    if ddp.rank == 0 and labelled is not None:
        metric = small_metric.SmallDataMetric(labelled["images"], labelled["labels"],
                                              args.metric_cache)

    # Prepare models for training; random streams per rank (official: seed + rank):
    logger = create_logger(args.results_dir, ddp.rank)
    model.train()
    torch.manual_seed(args.seed + ddp.rank)
    step = 0
    if checkpoint is not None:
        training.load_state_dict(checkpoint)
        step = checkpoint["step"]
        restore_rng(checkpoint["rng"], ddp, logger)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(f"data: {spec.summary}")
    logger.info(f"eMIGM-{args.size}: {num_params:,} parameters, {len(train_data.dataset):,} "
                f"examples, {ddp.world_size} process(es) on {ddp.device}, {args.precision}, "
                f"global batch {args.global_batch_size} ({args.accum_steps} micro-batch(es) of "
                f"{batch_size // args.accum_steps} per process), lr {args.lr:.3g}, "
                f"{total_steps} steps ({len(loader)} per epoch), starting at step {step}")

    result = train_loop(args, training, train_data, loader, ddp, logger, metric, step,
                        total_steps)
    if train_data.kind == "fashion-mnist" and "accuracy" in result:
        seconds = time.time() - start_time
        report_demo(metric, result, args.data_path, args.eval_samples, seconds, logger)
    if dist.is_initialized():
        dist.barrier()
    return training

# ---- Command line: argparse types check each flag, check_args them together ----
def check_args(args, world_size):
    """A copy of args with the defaults that depend on other flags, checked together
    and against the file system, before any work."""
    args = copy.copy(args)
    if args.cached_path is not None:  # --cached-path wins over --dataset
        args.dataset = "cached"
    if args.global_batch_size is None:  # the official batch per GPU, per process
        args.global_batch_size = BATCH_PER_GPU.get(args.size, 64) * world_size
    if args.lr is None:  # official
        args.lr = args.blr * args.global_batch_size / 256
    if args.global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible "
                         f"by the {world_size} processes: pass a multiple")
    per_process = args.global_batch_size // world_size
    if per_process % args.accum_steps:
        raise ValueError(f"--accum-steps {args.accum_steps} does not divide the "
                         f"{per_process} examples per process: pass a divisor")
    if args.precision is None:  # ours: bf16 on GPUs
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    if not args.cfg_interval[0] < args.cfg_interval[1]:
        raise ValueError(f"--cfg-interval {args.cfg_interval}: pass T_MIN < T_MAX")
    if args.t_min == 1:
        raise ValueError("--t-min 1: pass a time in [0, 1)")
    if args.vae is not None and not os.path.exists(args.vae):
        raise FileNotFoundError(f"--vae {args.vae} does not exist: pass MAR's kl16.ckpt")
    if args.metric_cache is None and not own_images(args):  # own images: one file per data
        args.metric_cache = str(sample.METRIC_CACHE)
    # the results folder: writable, no run but the one resumed
    path = Path(args.results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--results-dir {path} cannot be made ({error.strerror})")
    if not os.access(path, os.W_OK):
        raise ValueError(f"--results-dir {path} is not writable: pass another")
    earlier = [p.name for p in path.iterdir()
               if p.name in RUN_FILES or p.name.startswith(("ckpt_", "grid_"))]
    if earlier and args.resume is None:
        raise ValueError(f"--results-dir {path} holds a run ({', '.join(sorted(earlier))})"
                         f": pass another, or --resume {path / 'last.pt'}")
    return args

def model_overrides(args, spec=None):
    """The constructor arguments set by flags and by the data (a data.DataSpec)."""
    overrides = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    if args.dropout is not None:
        overrides.update(attn_dropout=args.dropout, proj_dropout=args.dropout)
    if args.dataset == "fashion-mnist":  # patches of 28x28 images, 10 classes
        patches = (28 // args.patch) ** 2
        overrides.update(seq_len=patches, token_channels=args.patch**2, num_classes=10)
    if spec is not None:  # pixel tokens, the classes, the unconditional contract
        overrides.update(data.model_fields(spec))
    return overrides

def model_config(size, img_size, overrides):
    """The checked config of that model, built on the meta device (no memory)."""
    try:
        with torch.device("meta"):
            config = build_model(size, img_size, overrides, device="meta").config
    except ValueError as error:
        raise ValueError(f"--size {size} --img-size {img_size}: {error}") from None
    if config["width"] % config["num_heads"]:
        raise ValueError(f"--width {config['width']} is not divisible by --num-heads "
                         f"{config['num_heads']}: pass a multiple")
    return config

def build_parser(argv=None):
    """The flags, defaults the paper's; with --demo in argv, the demo's settings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", action="store_true", help=f"the CPU demo: {DEMO}")
    p.add_argument("--bench", action="store_true", help="time steps on random data")
    p.add_argument("--size", default="B", choices=list(emigm.EMIGM_models))
    p.add_argument("--img-size", type=positive_int, default=256,
                   help="256 (KL-16), 512 (DC-AE latents); own images <= 64 (their own size)")
    p.add_argument("--dataset", default="imagefolder", choices=["imagefolder", "fashion-mnist", "random"])
    p.add_argument("--data-path", help="class folders (or a flat folder), or Fashion-MNIST's")
    p.add_argument("--cached-path", help="the latents of `tokenizer.py cache`")
    p.add_argument("--vae", help="kl16.ckpt: encodes images, decodes grids")
    p.add_argument("--patch", type=positive_int, default=4,
                   help="pixel patch: Fashion-MNIST 4; own images >= 16 tokens of <= 64")
    p.add_argument("--num-classes", type=positive_int, help="default: the data's")
    p.add_argument("--unconditional", action="store_true", help="no labels (flat folders too)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips of image folders (default: on)")
    p.add_argument("--num-workers", type=nonnegative_int, default=8)
    # the official recipe
    p.add_argument("--epochs", type=positive_int, default=800)
    p.add_argument("--max-steps", type=positive_int, help="overrides --epochs")
    p.add_argument("--global-batch-size", type=positive_int,
                   help="default: 32 per process for XS and S, 64 for B, L, H, Tiny")
    p.add_argument("--blr", type=positive_float, default=1e-4, help="lr = blr x batch / 256")
    p.add_argument("--lr", type=positive_float, help="overrides --blr")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=100)
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.02)
    p.add_argument("--grad-clip", type=nonnegative_float, default=3.0, help="0: none")
    p.add_argument("--ema-decay", type=unit_interval, default=0.9999)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="default: bf16 on CUDA, fp32 on CPU (others slow there)")
    p.add_argument("--accum-steps", type=positive_int, default=1, help="micro-batches")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile the stacks and head")
    p.add_argument("--seed", type=nonnegative_int, default=1, help="rank r: seed + r")
    # the model (None: the preset's value, the paper's)
    p.add_argument("--mask-schedule", choices=list(emigm.SCHEDULES), help="Fig. 2a")
    p.add_argument("--loss-weighting", choices=list(emigm.WEIGHTINGS), help="Fig. 2b")
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--mae", dest="use_mae", action=on_off, help="Fig. 2c")
    p.add_argument("--t-min", type=unit_interval, help="Fig. 2d: in [0, 1)")
    p.add_argument("--cfg-with-mask", action=on_off, help="Fig. 2e")
    p.add_argument("--diffusion-batch-mul", type=positive_int, help="head copies")
    p.add_argument("--label-drop-prob", type=unit_interval, help="for CFG")
    p.add_argument("--dropout", type=unit_interval, help="attention and projection")
    for name in ("width", "depth", "num-heads", "head-depth", "head-width", "buffer-size"):
        p.add_argument(f"--{name}", type=positive_int)
    # logging, checkpoints, evaluation
    p.add_argument("--results-dir", default="results", help="one run per folder")
    p.add_argument("--resume", help="a last.pt or ckpt_*.pt: continues its run")
    p.add_argument("--log-every", type=positive_int, default=100)
    p.add_argument("--save-every", type=positive_int, default=1000, help="for last.pt")
    p.add_argument("--ckpt-every", type=nonnegative_int, default=50000, help="0: never")
    p.add_argument("--sample-every", type=nonnegative_int, default=10000, help="0: end only")
    p.add_argument("--periodic-metric", action="store_true", help="at every grid")
    p.add_argument("--eval-samples", type=positive_int, default=1000)
    p.add_argument("--metric-cache", help="default: sample.METRIC_CACHE; own data: per hash")
    p.add_argument("--grid-per-class", type=positive_int, default=8)
    p.add_argument("--num-iter", type=positive_int, default=16, help="sampling steps K")
    p.add_argument("--cfg", type=guidance_scale, default=4.0, help="1: no guidance")
    p.add_argument("--cfg-schedule", default="constant", choices=list(sample.CFG_SCHEDULES))
    p.add_argument("--cfg-interval", type=unit_interval, nargs=2, default=[0.1, 0.3],
                   metavar=("T_MIN", "T_MAX"))
    p.add_argument("--head-steps", type=positive_int, default=8)
    first = p.parse_known_args(sys.argv[1:] if argv is None else argv)[0]  # which data
    if first.demo:  # flags given win
        p.set_defaults(**DEMO)
    elif own_images(first) and first.data_path is not None and not first.bench:
        p.set_defaults(**SMALL)
    return p

def own_images(args):
    """Own small images as pixel tokens: an image folder and no VAE."""
    return args.dataset == "imagefolder" and args.cached_path is None and args.vae is None

def main(argv=None):
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        if args.bench:
            import bench  # the benchmarks of train.py and sample.py live in bench.py
            bench.training(args)
        else:
            run(args)
    except (ValueError, FileNotFoundError) as error:
        message = " ".join(str(error).split())  # one line
        parser.exit(2, f"{parser.prog}: error: {message}\n")


if __name__ == "__main__":
    main()
