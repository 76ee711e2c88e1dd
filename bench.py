"""Benchmarks of eMIGM-mini: a training step and the sampler, on random weights of the paper's sizes.

Each prints its time beside the FLOPs it counted and the share of this process's fp32 matmul peak, so that
figures from a shared or noisy machine can still be compared (ratios, not seconds). Run:

    python bench.py train --size XS        # = python train.py --bench --size XS
    python bench.py train-memory --size XS # memory: checkpointing, accumulation
    python bench.py sample                 # = python sample.py --bench
"""
import argparse
import copy
import importlib
import multiprocessing
import os
import sys
import time
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter

import cli
import emigm
import sample
import train

BENCH_STEPS = 5  # timed training steps (after 2 of warm-up)


def matmul_peak_flops(device, clock=time.perf_counter, repeats=10):
    """The fp32 matmul peak, FLOP per second of `clock`: the best of `repeats` 2048^3 products
    on the model's kernel (emigm.linear: oneDNN's on CPU, which beats MKL's `a @ a` here)."""
    a = torch.randn(2048, 2048, device=device)
    best = 0.0
    for _ in range(repeats):
        start = clock()
        emigm.linear(a, a, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * 2048**3 / (clock() - start))
    return best


# ==== A training step (train.py --bench) ====
def training(args, steps=BENCH_STEPS, count_flops=True):
    """train.py --bench: the training loop's own step (forward, backward, clipping, AdamW,
    EMA) of --size on random tokens, timed (median of `steps`), and its FLOPs counted by
    torch; with --precision, --accum-steps, --grad-checkpointing.
    -> dict(seconds=, cpu_seconds=, peak_gb=)"""
    device = cli.setup_distributed().device
    torch.manual_seed(args.seed)
    lr = 1e-4 if args.lr is None else args.lr
    batch_size = 8 if args.global_batch_size is None else args.global_batch_size
    if batch_size % args.accum_steps:
        raise ValueError(f"--accum-steps {args.accum_steps} does not divide the batch "
                         f"{batch_size}: pass a divisor")
    precision = args.precision
    if precision is None:  # train.py's default
        precision = "bf16" if device.type == "cuda" else "fp32"
    model = train.build_model(args.size, args.img_size, train.model_overrides(args), device)
    training = train.Training(model, lr, args.weight_decay, args.grad_clip, args.ema_decay,
                              precision, accum_steps=args.accum_steps,
                              grad_checkpointing=args.grad_checkpointing, compile=args.compile)
    tokens = torch.randn(batch_size, model.seq_len, model.token_channels, device=device)
    labels = torch.arange(batch_size, device=device) % model.num_classes
    start = time.perf_counter()
    for _ in range(2):  # warm-up (and --compile's compilation)
        training.step(tokens, labels)
    print(f"warm-up, 2 steps{' (torch.compile)' if args.compile else ''}: "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    torch.manual_seed(args.seed)
    times = []
    cpu_times = []
    for _ in range(steps):
        start = time.perf_counter()
        cpu = time.process_time()
        training.step(tokens, labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    seconds = sorted(times)[steps // 2]
    cpu_seconds = sorted(cpu_times)[steps // 2]
    # the steps' peak, before the FLOP count (its math attention keeps (B, H, N, N))
    peak_gb = cli.peak_memory_gb(device)
    setting = (f"{precision}, {args.accum_steps} micro-batch(es)"
               f"{', grad checkpointing' if args.grad_checkpointing else ''}"
               f"{', compiled' if args.compile else ''}")
    print(f"eMIGM-{args.size}, {model.seq_len} tokens x {model.token_channels} ch, batch "
          f"{batch_size}, {device}, {torch.get_num_threads()} threads, {setting}: step "
          f"{seconds:.3f} s ({cpu_seconds:.3f} CPU-s, median of {steps}), "
          f"{batch_size / seconds:.1f} images/s, peak memory {peak_gb:.2f} GB", flush=True)
    result = dict(seconds=seconds, cpu_seconds=cpu_seconds, peak_gb=peak_gb)
    if not count_flops:
        return result
    peak = matmul_peak_flops(device)
    flops = training_flops(training, tokens, labels, steps, args.seed)
    achieved = flops / steps / seconds  # recomputed blocks count too
    print(f"{achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of the fp32 matmul peak "
          f"({peak / 1e9:.1f} GFLOP/s)")
    return result

def training_flops(training, tokens, labels, steps, seed):
    """The FLOPs of `steps` training steps from `seed` (the masks, so the shapes, of the
    timed steps) as torch counts them: attention as matmuls, and aten's matmuls rather than
    oneDNN's op, which torch does not count (the same FLOPs)."""
    torch.manual_seed(seed)
    onednn = emigm.ONEDNN
    emigm.ONEDNN = False
    try:
        with flop_counter.FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            for _ in range(steps):
                training.step(tokens, labels)
    finally:
        emigm.ONEDNN = onednn
    return counter.get_total_flops()

# train.py --bench flags of each row of the memory table (same global batch)
MEMORY_VARIANTS = {"baseline": [], "--grad-checkpointing": ["--grad-checkpointing"],
                   "--accum-steps 2": ["--accum-steps", "2"],
                   "--accum-steps 4": ["--accum-steps", "4"]}

def training_in_child(flags):  # runs in a fresh process: its peak RSS is its own
    args = train.build_parser().parse_args(["--bench", *flags])
    return training(args, steps=3, count_flops=False)

def training_memory(flags):
    """Peak memory (RSS on CPU) and step time of train.py --bench with `flags`: as is, with
    --grad-checkpointing, with --accum-steps 2 and 4; each in a fresh process. One table."""
    for variant in MEMORY_VARIANTS.values():  # bad flags: exit 2 here, before any child
        train.build_parser().parse_args(["--bench", *flags, *variant])
    rows = {}
    for name, variant in MEMORY_VARIANTS.items():
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            rows[name] = pool.apply(training_in_child, ([*flags, *variant],))
    base = rows["baseline"]
    print(f"train.py --bench {' '.join(flags)}, each in a fresh process:")
    print(f"{'variant':22s} {'peak GB':>8s} {'saved':>6s} {'step CPU-s':>10s} {'step s':>7s}")
    for name, row in rows.items():
        saved = 1 - row["peak_gb"] / base["peak_gb"]
        print(f"{name:22s} {row['peak_gb']:8.2f} {saved:6.0%} {row['cpu_seconds']:10.2f} "
              f"{row['seconds']:7.2f}")


# ==== The sampler (sample.py --bench) ====
def attention_flops(x, queries):
    """q k^T and attn v of n queries over the N positions of x (B, N, D); given queries (the
    last decoder block), also their q and x's k, v: matmuls on qkv's weight rows, not the
    qkv module, so no Linear hook sees them."""
    B, N, D = x.shape
    if queries is None:
        return 4 * B * N * N * D
    n = queries.shape[1]
    return 4 * B * n * N * D + 2 * B * n * D * D + 2 * B * N * D * 2 * D

def count_flops(model):
    """Forward hooks that count exactly what runs (Linear layers; attention_flops) -> the
    list they append each layer's FLOPs to."""
    flops = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(
                lambda m, i, o: flops.append(2 * i[0].numel() * m.out_features))
        elif isinstance(module, emigm.Attention):
            module.register_forward_hook(
                lambda m, i, kw, o: flops.append(attention_flops(i[0], kw.get("queries"))),
                with_kwargs=True)
    return flops

def sampling(bench_k=(16, 128), bench_batches=(1, 16, 64), compile=False):
    """s/image and share of the fp32 matmul peak per K and batch; at the first batch size, CFG on
    the interval / every step and K = 128 / 16 beside NFE. CPU time: jobs disturb it less;
    on a GPU (bf16, as sample.py) the synchronized wall time."""
    device = cli.setup_distributed().device
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    torch.manual_seed(0)
    model = emigm.EMIGM_models["XS"]().eval().to(device)
    presets = sample.PRESETS["XS", 256]
    flops = []  # hooks do not run in compiled graphs: no FLOPs
    if compile:  # as sample.py --compile
        cli.compile_model(model, freezing=True)
    else:
        flops = count_flops(model)
    peak = matmul_peak_flops(device, clock=clock, repeats=5)
    threads = torch.get_num_threads()
    unit = "CPU-s" if device.type == "cpu" else "GPU-s"
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP per {unit} ({device}, {threads} "
          f"threads)")
    b = bench_batches[0]
    every_step = (16, b, (0.0, 1.0))
    # warm-ups (--compile: every shape of the first batch size's runs, so that no compilation
    # is timed), then every K and batch, then CFG on every step
    warm_ups = [(2, 1, (0.1, 0.3))]
    if compile:
        warm_ups = [(k, b, presets[k]["cfg_interval"]) for k in bench_k] + [every_step]
    runs = list(warm_ups)
    runs += [(k, batch, presets[k]["cfg_interval"]) for k in bench_k for batch in bench_batches]
    runs += [every_step] if 16 in bench_k else []
    results = {}  # (K, batch, interval) -> (CPU seconds, NFE, FLOPs)
    for run, (k, batch, interval) in enumerate(runs):
        flops.clear()
        cpu = clock()
        wall = time.perf_counter()
        head_steps = presets[16 if k <= 16 else 128]["head_steps"]
        labels = torch.arange(batch, device=device)
        generator = torch.Generator(device).manual_seed(0)
        sample.sample_tokens(model, labels, k, 4.0, "constant", interval, "dpm-solver",
                             head_steps, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu = clock() - cpu
        wall = time.perf_counter() - wall
        f = sample.nfe(k, 4.0, interval)[1]
        results[k, batch, interval] = (cpu, k * f, sum(flops))
        if compile and run < len(warm_ups):
            print(f"torch.compile: warm-up K={k}, batch {batch}: {wall:.1f} s", flush=True)
            continue
        counted = f", {sum(flops) / 1e12:.3f} TFLOP, {sum(flops) / cpu / peak:.0%} of the matmul peak"
        print(f"K={k:3d} NFE = {k} x {f:.4f} (interval {interval}), batch {batch:2d}: "
              f"{wall / batch:.3f} s/image wall, {cpu / batch:.3f} {unit}/image"
              f"{counted if not compile else ''}", flush=True)
    k16 = (16, b, presets[16]["cfg_interval"])
    k128 = (128, b, presets[128]["cfg_interval"])
    checks = {"CFG interval / on every step": (k16, every_step), "K=128 / K=16": (k128, k16)}
    for name, (top, bottom) in checks.items():
        if top in results and bottom in results:
            cpu, nfe_ratio = [x / y for x, y in zip(results[top][:2], results[bottom][:2])]
            flops_ratio = results[top][2] / max(results[bottom][2], 1)  # 0 when compiled
            print(f"{name} (batch {b}): CPU time {cpu:.3f}; NFE {nfe_ratio:.3f}, FLOPs {flops_ratio:.3f}")


# ==== Against another checkout (bench.py compare --against DIR) ====
def modules_in(directory):
    """The names of the imported modules whose file lies in `directory`."""
    names = []
    for name, module in sys.modules.items():
        path = getattr(module, "__file__", None)
        if path is not None and os.path.dirname(os.path.abspath(path)) == directory:
            names.append(name)
    return names

def load_checkout(directory, names=("emigm", "sample")):
    """The modules `names` of the checkout in `directory`, imported beside ours in this
    process: theirs import each other, ours stay as they are."""
    # this checkout's modules, set aside while theirs are imported
    here = os.path.dirname(os.path.abspath(__file__))
    ours = {name: sys.modules.pop(name) for name in modules_in(here)}
    sys.path.insert(0, directory)
    try:
        theirs = {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(directory)
        for name in modules_in(directory):
            del sys.modules[name]
        sys.modules.update(ours)
    return theirs

def checkout_dir(text):
    """A folder with an eMIGM-mini checkout (its emigm.py and sample.py)."""
    if not all(os.path.isfile(os.path.join(text, name)) for name in ("emigm.py", "sample.py")):
        raise argparse.ArgumentTypeError(f"{text} has no emigm.py and sample.py: pass a checkout, "
                                         f"e.g. git worktree add ../base 5afb9bc")
    return os.path.abspath(text)

def timed_median(runs, rounds):
    """Alternating rounds of each run (a name -> function) -> name -> median seconds. The
    runs of a round start from one RNG state: training steps draw the same masks (the
    same work; the step time follows the masked count, +-10% at XS)."""
    times = {name: [] for name in runs}
    for round_ in range(rounds):
        for name, run in runs.items():
            torch.manual_seed(round_)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[rounds // 2] for name, values in times.items()}

def compare(directory, rounds=5, sample_batches=(4, 16), compile=False, size="XS"):
    """train.py --bench (batch 8) and sample.py --bench (K = 16, 8 DPM-Solver steps, CFG 4 on
    (0.1, 0.3]) of eMIGM-{size} in this checkout and in `directory`, alternating in this
    process on the same weights and inputs: median of `rounds`, and the speed-up. compile:
    ours with --compile (its compilation in the warm-ups)."""
    theirs = load_checkout(directory)
    cli.keep_freed_memory()  # the process's allocator: the same for both checkouts
    cli.limit_onednn_cache()
    models = {}
    for name, module in (("theirs", theirs["emigm"]), ("ours", emigm)):
        torch.manual_seed(0)
        models[name] = module.EMIGM_models[size]()
    models["theirs"].load_state_dict(models["ours"].state_dict())
    tokens = torch.randn(8, models["ours"].seq_len, models["ours"].token_channels)
    labels = torch.arange(8) % models["ours"].num_classes
    # sampling: eval copies (--compile: ours with constant weights)
    samplers = {name: copy.deepcopy(model).eval() for name, model in models.items()}
    if compile:
        cli.compile_model(models["ours"])
        cli.compile_model(samplers["ours"], freezing=True)
    # train.py's step (loss, backward, clipping, AdamW, EMA): the same code for both models
    steps = {}
    for name, model in models.items():
        training = train.Training(model.train(), lr=1e-4, weight_decay=0.02)
        steps[name] = partial(training.step, tokens, labels)
    for step in steps.values():  # warm-up
        step()
    rows = {f"{size} train step, batch 8": timed_median(steps, rounds)}
    sample_modules = {"theirs": theirs["sample"], "ours": sample}
    for batch in sample_batches:
        def sampling(name, batch=batch):
            generator = torch.Generator().manual_seed(0)
            labels = torch.arange(batch) % samplers[name].num_classes
            sample_modules[name].sample_tokens(samplers[name], labels, 16, 4.0,
                                               "constant", (0.1, 0.3), "dpm-solver", 8,
                                               generator=generator)
        runs = {name: partial(sampling, name) for name in sample_modules}
        if compile:  # warm-up: the compilation at this batch size
            sampling("ours")
        rows[f"{size} sample K=16, batch {batch}"] = timed_median(runs, rounds)
    print(f"median of {rounds}, alternating, {torch.get_num_threads()} threads; theirs: "
          f"{directory}; ours{' with --compile' if compile else ''}")
    print(f"{'work':28s} {'theirs s':>9s} {'ours s':>9s} {'speed-up':>9s}")
    for work, row in rows.items():
        print(f"{work:28s} {row['theirs']:9.3f} {row['ours']:9.3f} {row['theirs'] / row['ours']:8.2f}x")
    return rows


# ==== Command line ====
def main(argv=None):
    parser = argparse.ArgumentParser(description="eMIGM-mini benchmarks (random weights)")
    commands = parser.add_subparsers(dest="command", required=True)
    sampler = commands.add_parser("sample", help="the sampler of sample.py, XS at 256 px")
    sampler.add_argument("--bench-k", type=int, nargs="+", default=[16, 128], choices=[16, 128])
    sampler.add_argument("--bench-batches", type=cli.positive_int, nargs="+", default=[1, 16, 64])
    sampler.add_argument("--compile", action="store_true", help="as sample.py --compile")
    commands.add_parser("train", help="a training step of train.py: the flags of train.py --bench",
                        add_help=False)
    commands.add_parser("train-memory", add_help=False,
                        help="train: peak memory with checkpointing, accumulation")
    against = commands.add_parser("compare", help="train and sample steps against a checkout")
    against.add_argument("--against", type=checkout_dir, required=True,
                         help="another checkout, e.g. git worktree add ../base 5afb9bc")
    against.add_argument("--rounds", type=cli.positive_int, default=5)
    against.add_argument("--compile", action="store_true", help="ours with --compile")
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":  # train.py parses and checks its own flags
        train.main(["--bench", *rest])
        return
    if args.command == "train-memory":
        try:
            training_memory(rest)
        except ValueError as error:
            parser.exit(2, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "compare":
        compare(args.against, args.rounds, compile=args.compile)
        return
    sampling(args.bench_k, args.bench_batches, args.compile)


if __name__ == "__main__":
    main()
