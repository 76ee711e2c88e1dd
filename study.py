"""The paper's design space at Fashion-MNIST scale: Fig. 2 (training choices) and
Fig. 3 (sampling choices) of eMIGM (You et al. 2025, arXiv 2503.07197) on 2 CPU cores.

    python study.py all                  # every panel, <= 90 minutes on 2 cores (BUDGET)
    python study.py fig2d fig3c          # any panels alone; a re-run only plots
    python study.py all --out out/study  # runs/NAME/, figXX.csv, figXX.png, summary.md

Testbed: Fashion-MNIST as 4x4 pixel patches (49 tokens of 16 values, like KL-16's 16
channels, so that K up to 49 means something); the Tiny preset at width 128, 2+2 blocks,
a 2x128 head; the CPU demo's recipe (train.py's DEMO: lr 1e-3 at batch 64, cosine decay,
no dropout) with EMA 0.99, as the demo's 0.995 lags in 800 steps (at step 400 its EMA
scored FD_small 813, the raw weights 212).
* Fig. 2a-e: each variant is the eMIGM command of train.py with ONE studied flag changed
  (same seed, data order and steps). The EMA weights of the numbered checkpoints are
  sampled with one sampler (K = 16, cfg 3 on every step, 8 DPM-Solver steps) and scored
  with small_metric.SmallDataMetric (FD_small: a small CNN's Frechet distance, lower is better,
  not comparable with Inception FID).
* Fig. 3a-c: the eMIGM run's last checkpoint with one sampling choice changed, against K
  or NFE = K x f.
* Noise: each point is scored with two evaluation seeds, the same two for every variant.
  The verdict compares the paper's winner with the best other variant (means of the
  seeds); a gap no larger than the largest two-seed difference there is "within noise".

BUDGET (CPU seconds of one core, measured on the shared 2-core machine):
  training: 0.47 s a step (1 thread; no MAE ~20% more), 2 runs at a time (--jobs 2):
    8 runs x (800 x 0.47 s + 20 s start and train.py's final sample) = 3200 s
  Fig. 2: 24 checkpoints x 2 seeds x 400 images x 46 ms (K = 16, cfg every step) = 880 s
  Fig. 3, an image and seed: 3a 3 x (4 + 8 + 16 + 32 + 49) steps x 2.8 ms = 0.9 s, 3b
    DDPM's 100 head steps 0.45 s + 0.3 s, 3c 0.15 s: 1.8 s x 2 seeds x 300 = 1080 s
  sampling runs on 2 threads (1.7x); metric classifier once 60 s: ~50 minutes in all
  (measured 2026-11-28: 60 minutes on the 2-core machine with other jobs beside it).
"""
import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import checkpoints
import cli
import emigm
import sample
import small_metric
import tokenizer

HERE = Path(__file__).resolve().parent
EVAL_SEEDS = (0, 1)  # two evaluation seeds: their difference is the noise of a point
EVAL_BATCH = 250  # images per sampling batch; batch j seeded with cli.batch_seed(seed, j)
NO_MATPLOTLIB = "the plots need matplotlib (an optional extra): pip install matplotlib"
CSV_TYPES = dict(panel=str, variant=str, run=str, step=int, K=int, nfe=float, seed=int,
                 frechet=float, accuracy=float)  # the columns of figXX.csv

# Model flags, batch, steps, checkpoint interval, the checkpoints scored in Fig. 2 (at step
# 200 the EMA still holds 0.99^200 = 13% of the initial weights), train.py's own final
# sample, images per seed (Fig. 2, Fig. 3), the K of Fig. 3. `micro` is the tests' testbed:
# it runs every panel, its numbers mean nothing.
TESTBEDS = {
    "full": dict(model="--width 128 --depth 2 --num-heads 4 --head-depth 2 --head-width 128",
                 batch=64, steps=800, ckpt_every=200, scored=(400, 600, 800), train_eval=100,
                 samples=(400, 300), ks=(4, 8, 16, 32, 49)),
    "micro": dict(model="--width 32 --depth 1 --num-heads 2 --head-depth 1 --head-width 32",
                  batch=8, steps=2, ckpt_every=1, scored=(1, 2), train_eval=10, samples=(20, 20),
                  ks=(4, 8)),
}

# Fig. 2: one train.py flag per panel. `winner` is eMIGM's choice (the paper's finding); each run
# takes the winners of the other four panels, so a panel's variants differ in its flag only.
FIG2 = {
    "fig2a": dict(title="Fig. 2a: mask schedule", winner="exp",
                  paper="exp best (exp < cosine < linear in FID)",
                  variants={"linear": "--mask-schedule linear",
                            "cosine": "--mask-schedule cosine",
                            "exp": "--mask-schedule exp"}),
    "fig2b": dict(title="Fig. 2b: loss weighting w(t)", winner="constant",
                  paper="w(t) = 1 better than MDM's weighting",
                  variants={"constant": "--loss-weighting constant",
                            "mdm": "--loss-weighting mdm"}),
    "fig2c": dict(title="Fig. 2c: MAE encoder", winner="mae", paper="MAE better than no MAE",
                  variants={"mae": "--mae", "no-mae": "--no-mae"}),
    "fig2d": dict(title="Fig. 2d: time truncation t_min", winner="0.2",
                  paper="t_min = 0.2 best of 0 / 0.2 / 0.4",
                  variants={"0": "--t-min 0", "0.2": "--t-min 0.2", "0.4": "--t-min 0.4"}),
    "fig2e": dict(title="Fig. 2e: CFG with mask", winner="with-mask",
                  paper="CFG with mask better than a separate mask token",
                  variants={"with-mask": "--cfg-with-mask", "own-token": "--no-cfg-with-mask"}),
}

# The sampler of every point (the CPU demo's, cfg 3 on every step); Fig. 3 changes one choice.
SAMPLER = dict(num_iter=16, cfg=3.0, cfg_schedule="constant", cfg_interval=(0.0, 1.0),
               head_sampler="dpm-solver", head_steps=8, temperature=1.0, mask_schedule="exp")
FIG3 = {
    "fig3a": dict(title="Fig. 3a: sampling mask schedule", winner="exp", at_k=8, x="K",
                  paper="exp schedule best for few steps (K = 8)",
                  variants={"linear": dict(mask_schedule="linear"),
                            "cosine": dict(mask_schedule="cosine"),
                            "exp": dict(mask_schedule="exp")}),
    "fig3b": dict(title="Fig. 3b: head sampler", winner="dpm-solver", at_k=8, x="K",
                  paper="DPM-Solver (8 steps) better than DDPM (100) at equal small K (K = 8)",
                  variants={"dpm-solver": dict(head_sampler="dpm-solver", head_steps=8),
                            "ddpm": dict(head_sampler="ddpm", head_steps=100)}),
    "fig3c": dict(title="Fig. 3c: CFG on a time interval", winner="interval", at_k=16, x="nfe",
                  paper="CFG on (0.1, 0.3]: better FID at lower NFE than on every step (K = 16)",
                  variants={"interval": dict(cfg_interval=(0.1, 0.3)),
                            "every-step": dict(cfg_interval=(0.0, 1.0))}),
}
PANELS = [*FIG2, *FIG3]


@dataclass
class Study:
    out: Path  # the results folder
    testbed: dict  # one of TESTBEDS
    data_path: str  # the Fashion-MNIST IDX folder; None: the system's
    metric_cache: str  # small_metric.SmallDataMetric's classifier
    jobs: int  # train.py processes at a time
    points: dict = field(default_factory=dict)  # run -> its points (runs/NAME/points.json)
    metric: object = None  # small_metric.SmallDataMetric, built for the first point scored


# ---- Fig. 2: the runs, through train.py's own command line
def train_command(study, panel=None, variant=None):
    """train.py's flags for `variant` of `panel` (None: the eMIGM run), eMIGM's choice elsewhere.
    No --results-dir: the command is exactly what the variants of a panel share."""
    testbed = study.testbed
    every = testbed["ckpt_every"]
    command = f"--dataset fashion-mnist --size Tiny --patch 4 {testbed['model']} --buffer-size 4"
    # the CPU demo's recipe (train.py's DEMO) at 4x4 patches, EMA 0.99 for 800 steps; one seed
    command += f" --dropout 0 --diffusion-batch-mul 4 --global-batch-size {testbed['batch']}"
    command += " --blr 4e-3 --warmup-epochs 0.05 --lr-schedule cosine --ema-decay 0.99 --seed 1"
    command += f" --max-steps {testbed['steps']} --ckpt-every {every} --save-every {every}"
    # train.py's own final sample (a grid and its metric) with the study's sampler
    command += f" --log-every {every} --sample-every 0 --eval-samples {testbed['train_eval']}"
    command += " --grid-per-class 4 --num-iter 16 --cfg 3 --cfg-interval 0 1"
    # the studied choices in panel order: a panel's variants differ in this part only
    for name, spec in FIG2.items():
        choice = spec["winner"]
        if name == panel:
            choice = variant
        command += " " + spec["variants"][choice]
    paths = ["--metric-cache", study.metric_cache]
    if study.data_path is not None:
        paths += ["--data-path", study.data_path]
    return command.split() + paths


def run_name(panel, variant):
    """'emigm' for the run of all eMIGM choices (shared by all panels), else 'fig2a-linear'."""
    if variant == FIG2[panel]["winner"]:
        return "emigm"
    return f"{panel}-{variant}"


def train_run(command, run_dir, steps, threads):
    """Train one run unless its last checkpoint exists; a stopped run resumes from its last.pt."""
    record = run_dir / "study.json"
    if record.exists() and json.loads(record.read_text())["command"] != command:
        raise ValueError(f"{run_dir} holds a run of another command (another testbed?): "
                         f"delete it or pass another --out")
    if (run_dir / f"ckpt_{steps:07d}.pt").exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"command": command}))
    argv = [sys.executable, str(HERE / "train.py"), *command, "--results-dir", str(run_dir)]
    if (run_dir / "last.pt").exists():
        argv += ["--resume", str(run_dir / "last.pt")]
    print(f"training {run_dir.name} ({steps} steps), log: {run_dir / 'output.txt'}", flush=True)
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(run_dir / "output.txt", "a") as output:
        result = subprocess.run(argv, stdout=output, stderr=subprocess.STDOUT, env=env)
    seconds = time.time() - start
    if result.returncode != 0:
        lines = ["no output"] + (run_dir / "output.txt").read_text().strip().splitlines()
        raise ValueError(f"train.py stopped on {run_dir.name} ({lines[-1]}); "
                         f"its output: {run_dir / 'output.txt'}")
    record.write_text(json.dumps({"command": command, "seconds": seconds}))
    print(f"trained {run_dir.name} in {seconds:.0f} s", flush=True)


def train_all(study, runs):
    """Train the runs (name -> command), `jobs` train.py processes at a time, each with its share
    of this process's threads."""
    threads = max(torch.get_num_threads() // study.jobs, 1)
    pool = ThreadPoolExecutor(max_workers=study.jobs)
    futures = []
    for name, command in runs.items():
        run_dir = study.out / "runs" / name
        futures.append(pool.submit(train_run, command, run_dir, study.testbed["steps"], threads))
    try:
        for future in futures:
            future.result()
    finally:  # after an error, the runs not started yet are not started
        pool.shutdown(cancel_futures=True)


# ---- Scoring: EMA samples of a checkpoint, FD_small and accuracy, cached per point
def score(model, metric, sampler_kwargs, samples, seed, device):
    """FD_small and accuracy of `samples` class-balanced samples, batch j seeded (seed, j)."""
    tok = tokenizer.PixelTokenizer(patch=4, img_size=28, in_channels=1)
    labels = torch.arange(samples) % model.num_classes
    batches = []
    for j, rows in enumerate(labels.split(EVAL_BATCH)):
        seed_j = cli.batch_seed(seed, j)
        batches.append(sample.generate(model, tok, rows, sampler_kwargs, seed_j, device))
    images = np.concatenate(batches)  # (N, 28, 28, 3) uint8, grey repeated
    return metric.evaluate(images[..., 0], labels.numpy())  # {'frechet', 'accuracy'}


def point(study, run, step, sampler_kwargs, samples, seed):
    """One point (run, checkpoint step, sampler, number of images, seed), scored once. A run's
    points live in its folder (runs/NAME/points.json): a deleted run takes its points along."""
    path = study.out / "runs" / run / "points.json"
    if run not in study.points:
        study.points[run] = {}
        if path.exists():
            study.points[run] = json.loads(path.read_text())
    points = study.points[run]
    key = json.dumps(dict(step=step, sampler=sampler_kwargs, samples=samples, seed=seed),
                     sort_keys=True)
    if key in points:
        return points[key]
    if study.metric is None:  # the train split; its classifier is trained once, then cached
        images, labels = tokenizer.load_fashion_mnist("train", study.data_path)
        study.metric = small_metric.SmallDataMetric(images.numpy(), labels.numpy(), study.metric_cache)
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the EMA weights, in a model rebuilt from the checkpoint's config
    ckpt = checkpoints.load_checkpoint(study.out / "runs" / run / f"ckpt_{step:07d}.pt")
    model = emigm.EMIGM(**ckpt["config"])
    checkpoints.load_weights(model, ckpt, ema=True)
    model = model.to(device).eval()
    result = score(model, study.metric, sampler_kwargs, samples, seed, device)
    points[key] = dict(frechet=result["frechet"], accuracy=result["accuracy"])
    print(f"  {run} step {step}, {sampler_kwargs}, seed {seed}: "
          f"FD_small {result['frechet']:.2f}, accuracy {result['accuracy']:.3f} "
          f"({time.time() - start:.0f} s)", flush=True)
    # written after every point, so that a stopped study loses one point at most
    path.with_suffix(".tmp").write_text(json.dumps(points, indent=0))
    os.replace(path.with_suffix(".tmp"), path)
    return points[key]


# ---- The panels
def panel_rows(study, panel):
    """Every point of a panel, both seeds. Fig. 2: each numbered checkpoint of each variant, one
    sampler; Fig. 3: the eMIGM run's last checkpoint, each variant's sampler at each K."""
    testbed = study.testbed
    steps = testbed["steps"]
    plan = []  # one dict per point, before the seeds
    if panel in FIG2:
        for variant in FIG2[panel]["variants"]:
            name = run_name(panel, variant)
            for step in testbed["scored"]:
                plan.append(dict(variant=variant, run=name, step=step, sampler=SAMPLER,
                                 samples=testbed["samples"][0]))
    else:
        for variant, choice in FIG3[panel]["variants"].items():
            for k in testbed["ks"]:
                sampler = {**SAMPLER, **choice, "num_iter": k}
                plan.append(dict(variant=variant, run="emigm", step=steps, sampler=sampler,
                                 samples=testbed["samples"][1]))
    rows = []
    for p in plan:
        k = p["sampler"]["num_iter"]
        nfe = k * sample.nfe(k, p["sampler"]["cfg"], p["sampler"]["cfg_interval"])[1]  # K x f
        for seed in EVAL_SEEDS:
            result = point(study, p["run"], p["step"], p["sampler"], p["samples"], seed)
            rows.append(dict(panel=panel, variant=p["variant"], run=p["run"], step=p["step"],
                             K=k, nfe=nfe, seed=seed, **result))
    return rows


def verdict(panel, rows):
    """The paper's winner against the best other variant, means of the seeds, at the last step
    (Fig. 2) or at K = at_k (Fig. 3, or the nearest K run); spread: the largest two-seed
    difference among those points."""
    if panel in FIG2:
        spec = FIG2[panel]
        where = "step"
        at = max(row["step"] for row in rows)
    else:
        spec = FIG3[panel]
        where = "K"
        at = min({row["K"] for row in rows}, key=lambda k: abs(k - spec["at_k"]))
    means = {}
    spread = 0.0
    for variant in spec["variants"]:
        ours = [row for row in rows if row["variant"] == variant and row[where] == at]
        values = [row["frechet"] for row in ours]
        means[variant] = float(np.mean(values))
        spread = max(spread, max(values) - min(values))
    winner = spec["winner"]
    gap = min(means[v] for v in means if v != winner) - means[winner]  # > 0: the winner is best
    outcome = "agree" if gap > 0 else "disagree"
    if abs(gap) <= spread:
        outcome = "within noise"
    ours = " < ".join(f"{v} {means[v]:.1f}" for v in sorted(means, key=means.get))
    return dict(paper=spec["paper"], ours=f"{ours} ({where} {at})", gap=gap, spread=spread,
                verdict=outcome)


# ---- Outputs: a CSV and a plot per panel, one summary of all
def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{name: CSV_TYPES[name](value) for name, value in row.items()} for row in rows]


def plot_panel(panel, rows, path):
    """The paper's layout: FD against training steps (Fig. 2), K (Fig. 3a, b) or NFE (Fig. 3c);
    a line per variant through the means of the seeds, the two seeds as its error bar."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(NO_MATPLOTLIB) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if panel in FIG2:
        spec = FIG2[panel]
        x_name = "step"
    else:
        spec = FIG3[panel]
        x_name = spec["x"]
    x_label = {"step": "training steps", "K": "sampling steps K", "nfe": "NFE = K x f"}[x_name]
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for variant in spec["variants"]:
        ours = [row for row in rows if row["variant"] == variant]
        xs = sorted({row[x_name] for row in ours})
        values = [[row["frechet"] for row in ours if row[x_name] == x] for x in xs]
        mean = np.array([np.mean(v) for v in values])
        low = mean - np.array([min(v) for v in values])
        high = np.array([max(v) for v in values]) - mean
        ax.errorbar(xs, mean, yerr=[low, high], marker="o", capsize=3, label=variant)
    ax.set_xlabel(x_label)
    ax.set_ylabel("FD_small (lower is better)")
    ax.set_title(spec["title"], fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(out):
    """out/summary.md: a row per panel with a CSV in `out`: the paper, ours, the verdict."""
    lines = ["| panel | the paper | ours (FD_small, mean of 2 seeds) | gap (spread) | verdict |",
             "|---|---|---|---|---|"]
    for panel in PANELS:
        if (out / f"{panel}.csv").exists():
            v = verdict(panel, read_csv(out / f"{panel}.csv"))
            lines.append(f"| {panel} | {v['paper']} | {v['ours']} | {v['gap']:+.1f} "
                         f"({v['spread']:.1f}) | {v['verdict']} |")
    table = "\n".join(lines)
    note = ("gap: FD of the best other variant minus the paper's winner's (> 0: the paper's "
            "winner is best); spread: the largest difference of the two seeds at those points.")
    (out / "summary.md").write_text(f"{table}\n\n{note}\n")
    return table


# ---- Command line
def check_writable(out):
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write there ({error.strerror}): "
                         f"pass a writable folder") from None


def run(args):
    panels = PANELS
    if "all" not in args.panels:
        panels = [p for p in PANELS if p in args.panels]  # the paper's order, each once
    # every check before any work: matplotlib, the data folder, the results folder
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(NO_MATPLOTLIB)
    if args.data_path is not None and not os.path.isdir(args.data_path):
        raise FileNotFoundError(f"--data-path {args.data_path} is not a folder: "
                                f"pass the folder of the Fashion-MNIST IDX files")
    out = Path(args.out)
    check_writable(out)
    testbed = TESTBEDS["micro" if args.micro else "full"]
    study = Study(out, testbed, args.data_path, args.metric_cache, args.jobs)
    # the runs of all the panels first (a run shared by panels once), then each panel's points
    runs = {"emigm": train_command(study)}
    for panel in panels:
        if panel in FIG2:
            for variant in FIG2[panel]["variants"]:
                runs[run_name(panel, variant)] = train_command(study, panel, variant)
    train_all(study, runs)
    for panel in panels:
        start = time.time()
        rows = panel_rows(study, panel)
        with open(out / f"{panel}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(CSV_TYPES))
            writer.writeheader()
            writer.writerows(rows)
        plot_panel(panel, rows, out / f"{panel}.png")
        print(f"{panel}: {out / panel}.csv, .png ({time.time() - start:.0f} s)", flush=True)
    print(write_summary(out))


def build_parser():
    parser = argparse.ArgumentParser(prog="study.py", description=__doc__.splitlines()[0])
    parser.add_argument("panels", nargs="+", metavar="PANEL", choices=[*PANELS, "all"],
                        help="fig2a ... fig2e, fig3a ... fig3c, or all")
    parser.add_argument("--out", default="out/study", help="results (runs, points: cached)")
    parser.add_argument("--micro", action="store_true", help="the tests' tiny testbed")
    parser.add_argument("--jobs", type=cli.positive_int, default=2,
                        help="train.py processes at a time, sharing the threads (2 cores: 2)")
    parser.add_argument("--data-path", help="Fashion-MNIST IDX folder (default: the system's)")
    parser.add_argument("--metric-cache", default=str(sample.METRIC_CACHE),
                        help="small_metric.SmallDataMetric's classifier (trained once)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(error).split())}\n")


if __name__ == "__main__":
    main()
