"""Tests of study.py: a micro run of every panel (2 training steps, 20 samples a point, on 40
synthetic Fashion-MNIST-format images) writes its CSV, plot and summary row; the variants of a
panel differ only in the choice they study; a re-run only plots; the verdict's closed cases; bad
inputs give one line and exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import study

HERE = Path(__file__).parent
# The model config key that each Fig. 2 panel's flag sets (train.py -> emigm.EMIGM)
CONFIG_KEY = {"fig2a": "mask_schedule", "fig2b": "loss_weighting", "fig2c": "use_mae",
              "fig2d": "t_min", "fig2e": "cfg_with_mask"}


def micro_argv(out, fashion_folder, panels=("all",)):
    return [*panels, "--micro", "--out", str(out), "--data-path", str(fashion_folder),
            "--metric-cache", str(fashion_folder / "metric.pt")]


@pytest.fixture(scope="module")
def micro(tmp_path_factory, fashion_folder):
    """`study.py all --micro` in this process with one torch thread (so each train.py gets one);
    the thread count and the global RNG (models are rebuilt from configs) are restored after it."""
    out = tmp_path_factory.mktemp("study")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            study.main(micro_argv(out, fashion_folder))
    finally:
        torch.set_num_threads(threads)
    return out


def test_every_panel_writes_its_csv_plot_and_summary_row(micro):
    testbed = study.TESTBEDS["micro"]
    summary = (micro / "summary.md").read_text()
    for panel in study.PANELS:
        rows = study.read_csv(micro / f"{panel}.csv")
        if panel in study.FIG2:
            variants = len(study.FIG2[panel]["variants"])
            assert len(rows) == variants * len(testbed["scored"]) * len(study.EVAL_SEEDS)
            assert sorted({row["step"] for row in rows}) == list(testbed["scored"])
        else:
            variants = len(study.FIG3[panel]["variants"])
            assert len(rows) == variants * len(testbed["ks"]) * len(study.EVAL_SEEDS)
            assert sorted({row["K"] for row in rows}) == list(testbed["ks"])
        assert all(np.isfinite(row["frechet"]) and 0 <= row["accuracy"] <= 1 for row in rows)
        # the second seed is a second draw: its points differ from the first seed's
        by_seed = []
        for seed in study.EVAL_SEEDS:
            by_seed.append([row["frechet"] for row in rows if row["seed"] == seed])
        assert by_seed[0] != by_seed[1]
        with Image.open(micro / f"{panel}.png") as image:
            assert image.size[0] > 300 and image.size[1] > 200
        line = next(line for line in summary.splitlines() if line.startswith(f"| {panel} |"))
        assert line.split("|")[-2].strip() in ("agree", "disagree", "within noise")


def test_fig2_variants_differ_only_in_the_studied_flag(micro):
    """Commands: the same arguments but the studied flag; checkpoints: the same config and train
    args but its key; the eMIGM run is shared by all five panels (trained once)."""
    expected_runs = {"emigm"}
    emigm_dir = micro / "runs" / "emigm"
    emigm_command = json.loads((emigm_dir / "study.json").read_text())["command"]
    emigm_ckpt = torch.load(emigm_dir / "ckpt_0000002.pt", weights_only=True)
    for panel, spec in study.FIG2.items():
        winner_flags = spec["variants"][spec["winner"]]
        for variant, flags in spec["variants"].items():
            name = study.run_name(panel, variant)
            expected_runs.add(name)
            command = json.loads((micro / "runs" / name / "study.json").read_text())["command"]
            assert len(command) == len(emigm_command)
            differ = [i for i, (a, b) in enumerate(zip(command, emigm_command)) if a != b]
            studied = [a for a, b in zip(flags.split(), winner_flags.split()) if a != b]
            assert [command[i] for i in differ] == studied
            ckpt = torch.load(micro / "runs" / name / "ckpt_0000002.pt", weights_only=True)
            config = ckpt["config"]
            config_diff = {k for k in config if config[k] != emigm_ckpt["config"][k]}
            args_diff = {k for k in ckpt["args"] if ckpt["args"][k] != emigm_ckpt["args"][k]}
            if variant == spec["winner"]:
                assert name == "emigm"
            else:
                assert config_diff == {CONFIG_KEY[panel]}
                assert args_diff == {CONFIG_KEY[panel], "results_dir"}
    assert {p.name for p in (micro / "runs").iterdir()} == expected_runs


def test_fig3_variants_apply_their_choice_and_share_the_emigm_point(micro):
    """Each variant's choice reaches the sampler: its points differ from the eMIGM sampler's (fig3c:
    in NFE, as the micro model's guidance is too weak to change a pixel); the eMIGM sampler's
    points (exp, DPM-Solver, CFG on every step) are one point in all three panels."""
    emigm_sampler = {"fig3a": "exp", "fig3b": "dpm-solver", "fig3c": "every-step"}
    column = {"fig3a": "frechet", "fig3b": "frechet", "fig3c": "nfe"}
    shared = {}
    for panel, spec in study.FIG3.items():
        rows = study.read_csv(micro / f"{panel}.csv")
        ours = [row[column[panel]] for row in rows if row["variant"] == emigm_sampler[panel]]
        for variant in spec["variants"]:
            theirs = [row[column[panel]] for row in rows if row["variant"] == variant]
            if variant != emigm_sampler[panel]:
                assert theirs != ours, f"{panel} {variant}: the points of {emigm_sampler[panel]}"
        for row in rows:
            if row["variant"] == emigm_sampler[panel]:
                shared.setdefault((row["K"], row["seed"]), set()).add(row["frechet"])
    assert len(shared) == len(study.TESTBEDS["micro"]["ks"]) * len(study.EVAL_SEEDS)
    assert all(len(values) == 1 for values in shared.values())


def test_rerun_only_plots(micro, fashion_folder, monkeypatch):
    """A second run trains nothing and samples nothing, and writes the same CSVs."""
    before = {p.name: p.read_bytes() for p in micro.glob("*.csv")}

    def no_work(*args, **kwargs):
        raise AssertionError("a cached run or point was computed again")
    monkeypatch.setattr(study.subprocess, "run", no_work)
    monkeypatch.setattr(study, "score", no_work)
    study.main(micro_argv(micro, fashion_folder))
    assert {p.name: p.read_bytes() for p in micro.glob("*.csv")} == before


def rows_of(panel, values, at):
    """Rows of `panel` at step / K `at`: values = {variant: (seed 0 FD, seed 1 FD)}."""
    rows = []
    for variant, pair in values.items():
        for seed, frechet in enumerate(pair):
            rows.append(dict(variant=variant, step=at, K=at, seed=seed, frechet=frechet))
    return rows


def test_verdict_closed_cases():
    # the last step decides: an earlier step with the opposite order is ignored
    early = rows_of("fig2b", {"constant": (30.0, 30.0), "mdm": (20.0, 20.0)}, 100)
    last = rows_of("fig2b", {"constant": (10.0, 11.0), "mdm": (14.0, 15.0)}, 200)
    agree = study.verdict("fig2b", early + last)
    assert agree["verdict"] == "agree" and agree["gap"] == 4.0 and agree["spread"] == 1.0
    last = rows_of("fig2b", {"constant": (14.0, 15.0), "mdm": (10.0, 11.0)}, 200)
    disagree = study.verdict("fig2b", last)
    assert disagree["verdict"] == "disagree" and disagree["gap"] == -4.0
    last = rows_of("fig2b", {"constant": (10.0, 11.5), "mdm": (11.0, 12.0)}, 200)
    noise = study.verdict("fig2b", last)
    assert noise["verdict"] == "within noise" and noise["gap"] == 0.75 and noise["spread"] == 1.5
    # three variants: the gap is to the best other one; Fig. 3 at K = at_k (8 for fig3a)
    rows = rows_of("fig3a", {"linear": (9.0, 9.0), "cosine": (7.0, 7.0), "exp": (6.0, 6.5)}, 8)
    rows += rows_of("fig3a", {"linear": (1.0, 1.0), "cosine": (1.0, 1.0), "exp": (5.0, 5.0)}, 16)
    three = study.verdict("fig3a", rows)
    assert three["verdict"] == "agree" and three["gap"] == 0.75
    assert three["ours"].startswith("exp ") and three["ours"].endswith("(K 8)")


@pytest.fixture
def written(tmp_path):
    """A results folder with a file and a run of another command: nothing written may change."""
    out = tmp_path / "out"
    (out / "runs" / "emigm").mkdir(parents=True)
    (out / "keep.txt").write_text("kept")
    other = json.dumps({"command": ["--another", "testbed"]})
    (out / "runs" / "emigm" / "study.json").write_text(other)
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path


def snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


BAD_INPUTS = [
    (["fig9"], "PANEL"),
    (["fig2a", "--out", "{tmp}/a-file/study"], "--out"),
    (["fig2a", "--out", "{tmp}/out", "--data-path", "{tmp}/nope"], "--data-path"),
    (["fig2a", "--out", "{tmp}/out", "--jobs", "0"], "--jobs"),
    (["fig3a", "--micro", "--out", "{tmp}/out"], "--out"),  # its run folder holds another command
]


@pytest.mark.parametrize("argv, flag", BAD_INPUTS)
def test_bad_input_is_one_line_and_changes_nothing(written, argv, flag, capsys):
    before = snapshot(written)
    with pytest.raises(SystemExit) as exit_info:
        study.main([arg.format(tmp=written) for arg in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and flag in err[-1], err
    assert err[-1].startswith("study.py: error:") and "Traceback" not in "\n".join(err)
    assert snapshot(written) == before


def test_bad_input_from_the_command_line(tmp_path):
    argv = [sys.executable, str(HERE / "study.py"), "fig2z", "--out", str(tmp_path / "out")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid choice: 'fig2z'" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_missing_matplotlib_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    real_find_spec = study.importlib.util.find_spec

    def find_spec(name, *args):
        if name == "matplotlib":
            return None
        return real_find_spec(name, *args)
    monkeypatch.setattr(study.importlib.util, "find_spec", find_spec)
    with pytest.raises(SystemExit) as exit_info:
        study.main(["fig2a", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
