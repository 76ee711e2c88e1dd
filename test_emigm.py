"""Tests of emigm.py: equivalence with the official code (testdata/emigm_tiny_reference.pt, computed with ML-GSAI/eMIGM
at de78623), the official state_dict layout of every preset, and the invariants of masking, weighting and training.
Run: python -m pytest -q test_emigm.py"""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch

import emigm

HERE = Path(__file__).parent
REF = torch.load(HERE / "testdata" / "emigm_tiny_reference.pt", weights_only=True)
MANIFEST = HERE / "testdata" / "emigm_state_dict_manifest.json"
TOL = 1e-5  # max |ours - official| / max |official|


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def tiny_reference_model():
    c = REF["config"]
    model = emigm.EMIGM(seq_len=c["seq_len"], token_channels=c["token_embed_dim"], width=c["encoder_embed_dim"],
                        depth=c["encoder_depth"], num_heads=c["encoder_num_heads"], head_depth=c["diffloss_d"],
                        head_width=c["diffloss_w"], num_classes=c["class_num"], buffer_size=c["buffer_size"],
                        mask_schedule=c["mask_strategy"], t_min=c["clamp_t_min"],
                        diffusion_batch_mul=c["diffusion_batch_mul"])
    model.load_state_dict(REF["state_dict"], strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("case", ["mask_a", "mask_b", "mask_full", "mask_none"])
def test_encoder_decoder_match_official(case):
    model, inputs = tiny_reference_model(), REF["inputs"]
    class_emb = model.class_emb(inputs["labels"])
    assert rel_err(class_emb, REF["mae"]["class_embedding"]) <= TOL
    mask = inputs[case].bool()
    with torch.no_grad():
        enc = model.forward_encoder(inputs["tokens"], mask, class_emb)
        z = model.forward_decoder(enc, mask)
    assert enc.shape == REF["mae"][f"{case}/cond/enc"].shape
    assert rel_err(enc, REF["mae"][f"{case}/cond/enc"]) <= TOL
    assert rel_err(z, REF["mae"][f"{case}/cond/z"]) <= TOL


def test_cfg_batch_uses_fake_latent_as_uncond_class():
    model, inputs, ref = tiny_reference_model(), REF["inputs"], REF["mae"]
    class_emb = torch.cat([model.class_emb(inputs["labels"]), model.fake_latent.expand(4, -1)])  # cond; uncond
    assert rel_err(class_emb, ref["mask_a/cfg_batch/class_embedding"]) <= TOL
    tokens, mask = inputs["tokens"].repeat(2, 1, 1), inputs["mask_a"].bool().repeat(2, 1)
    with torch.no_grad():
        enc = model.forward_encoder(tokens, mask, class_emb)
        assert rel_err(enc, ref["mask_a/cfg_batch/enc"]) <= TOL
        assert rel_err(model.forward_decoder(enc, mask), ref["mask_a/cfg_batch/z"]) <= TOL


def test_head_matches_official():
    net, ref = tiny_reference_model().diffloss.net, REF["net"]
    with torch.no_grad():
        assert rel_err(net(ref["x"], ref["t_int"], ref["c"]), ref["out_t_int"]) <= TOL
        out = net(ref["x"], ref["t_frac"], ref["c"])  # fractional t, as DPM-Solver calls it
        assert rel_err(out, ref["out_t_frac"]) <= TOL
        assert rel_err(out[:, :16], ref["eps_dpmsolver_t_frac"]) <= TOL
        assert rel_err(net.time_embed(ref["t_frac"]), ref["time_embed_t_frac"]) <= TOL


def test_diffusion_loss_terms_match_official():
    model, ref = tiny_reference_model(), REF["diff_train"]
    assert (ref["t"] == 0).any(), "the reference covers the t = 0 decoder-NLL branch"
    with torch.no_grad():
        terms = model.diffloss(ref["x_start"], ref["c"], t=ref["t"], noise=ref["noise"])
    for name in ("mse", "vb", "loss"):
        assert rel_err(terms[name], ref[name]) <= TOL, name
    masked_mean = (terms["loss"] * ref["mask"]).sum() / ref["mask"].sum()
    assert rel_err(masked_mean, ref["masked_mean_loss"]) <= TOL
    betas = model.diffloss.diffusion.betas
    assert rel_err(betas, REF["schedules"]["cosine_betas_float64"]) <= 1e-12


def test_full_forward_matches_official():
    """The official loss runs the head on all B*L*mul rows and weights by the mask; ours runs only the masked rows
    (with the same t and noise): same value."""
    model, ref = tiny_reference_model(), REF["full_forward"]
    tokens = ref["imgs"].flatten(2).transpose(1, 2)  # patchify (patch 1): (B, C, h, w) -> (B, h*w, C)
    mask = ref["mask"].bool()
    mul = model.diffusion_batch_mul
    rows = mask.flatten().repeat(mul)  # the official rows are the B*L block tiled mul times
    with torch.no_grad():
        z = model.forward_decoder(model.forward_encoder(tokens, mask, model.class_embedding(ref["labels"])), mask)
        terms = model.diffloss(tokens[mask].repeat(mul, 1), z[mask].repeat(mul, 1), ref["t"][rows], ref["noise"][rows])
    for name in ("mse", "vb", "loss"):
        assert rel_err(terms[name], ref["loss_terms"][name][rows]) <= TOL
    assert rel_err(terms["loss"].mean(), ref["loss"]) <= TOL


# ---------------------------------------------------------------------------------------------- layout and presets
def manifest():
    return json.loads(MANIFEST.read_text())


@pytest.mark.parametrize("name", list(manifest()["configs"]))
def test_presets_match_official_state_dict_layout(name):
    entry = manifest()["configs"][name]
    size = {"xsmall": "XS", "small": "S", "base": "B", "large": "L", "huge": "H"}[name.split("_")[1]]
    with torch.device("meta"):  # no memory, no time
        model = emigm.EMIGM_models[size](img_size=int(name.split("_")[2]))
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k["key"], k["shape"]) for k in entry["keys"]]  # same keys, shapes and order
    assert sum(p.numel() for p in model.parameters()) == entry["total_params_dedup"]
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("diffloss")) == \
        entry["params_excluding_diffloss"]
    if name in manifest()["paper_table2_params_M"]:
        assert round(entry["total_params_dedup"] / 1e6) == manifest()["paper_table2_params_M"][name]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="H exists only at 256px"):
        emigm.create_emigm("H", img_size=512)


# ---------------------------------------------------------------------------------------------- masking and weights
@pytest.mark.parametrize("schedule", ["exp", "cosine", "linear"])
def test_masking_statistics(schedule):
    g = torch.Generator().manual_seed(0)
    t_min, L, ratios = 0.2, 64, []
    for _ in range(2000):
        mask, t = emigm.sample_mask(8, L, schedule, t_min, generator=g)
        counts = mask.sum(1)
        assert (counts == counts[0]).all() and counts[0] >= 2  # equal per row, at least 2
        assert t_min <= t <= 1
        ratios.append(counts[0].item() / L)
    assert not (mask == mask[0]).all(), "positions are independent per row"
    # E[ratio] = the schedule's average over [t_min, 1] (with the official t -> (1 - 1e-3) t + 1e-3 map); t < t_min
    # is clamped to t_min, which puts mass t_min at t_min.
    ts = torch.linspace(t_min, 1, 100001, dtype=torch.float64)
    gamma = lambda t: emigm.mask_ratio((1 - 1e-3) * t + 1e-3, schedule).double()
    expected = t_min * gamma(torch.tensor(t_min)) + torch.trapezoid(gamma(ts), ts)
    assert abs(sum(ratios) / len(ratios) - expected.item()) < 0.01


def test_weights_closed_forms():
    t = torch.linspace(0.05, 0.95, 19)
    assert torch.equal(emigm.loss_weight(t, "exp"), torch.ones_like(t))  # eMIGM: w = 1
    closed = {"linear": 1 / t, "cosine": math.pi / 2 * torch.tan(math.pi / 2 * (1 - t)),
              "exp": 5 * torch.exp(-5 * t) / (1 - torch.exp(-5 * t))}
    for schedule, w in closed.items():
        assert torch.allclose(emigm.loss_weight(t, schedule, "mdm"), w, rtol=1e-5)
    assert torch.allclose(emigm.mask_ratio(t, "cosine"), torch.cos(math.pi / 2 * (1 - t)))
    assert emigm.mask_ratio(1.0, "exp") == 1 - math.exp(-5)
    with pytest.raises(ValueError, match="unknown mask schedule"):
        emigm.mask_ratio(t, "quadratic")


# ---------------------------------------------------------------------------------------------- training
def small_model(**kw):
    torch.manual_seed(0)
    return emigm.EMIGM(**{**dict(seq_len=16, token_channels=4, width=32, depth=1, num_heads=2, head_depth=1,
                                 head_width=32, num_classes=4, buffer_size=2), **kw})


@pytest.mark.parametrize("variant", [{}, {"use_mae": False}, {"cfg_with_mask": False}, {"loss_weighting": "mdm"}])
def test_tiny_model_overfits_one_batch(variant):
    model = small_model(**variant, attn_dropout=0.0, proj_dropout=0.0)
    tokens, labels = torch.randn(8, 16, 4), torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    masks = [emigm.sample_mask(8, 16, generator=g)[0] for _ in range(4)]  # fixed masks: a fixed objective
    eval_loss = lambda: sum(model(tokens, labels, m).item() for m in masks for _ in range(8)) / 32
    torch.manual_seed(2)
    before = eval_loss()
    for step in range(150):
        loss = model(tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(2)
    after = eval_loss()
    assert after < before / 3, (before, after)  # the loss (mse + vb) falls by more than 3x
    if variant.get("cfg_with_mask", True):
        assert model.mask_token is model.fake_latent


def test_bf16_autocast_forward_is_finite():
    model = small_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 16, 4), torch.tensor([0, 1]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_official_checkpoint_loads_with_ema_quirk(tmp_path):
    """An official file: {'model', 'model_ema', 'args': Namespace}. model_ema holds the EMA under 'fake_latent' and the
    raw value under 'mask_token'; after loading, the tied vector holds the raw value, as in the official code."""
    model = tiny_reference_model()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v + 0.5 for k, v in raw.items()}
    ema["mask_token"] = raw["fake_latent"].clone()
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": raw, "model_ema": ema, "args": argparse.Namespace(model="emigm_tiny"), "epoch": 3}, path)
    ckpt = emigm.load_checkpoint(path)
    fresh = tiny_reference_model()
    emigm.load_weights(fresh, ckpt, ema=True)
    assert torch.equal(fresh.fake_latent, raw["fake_latent"]) and fresh.mask_token is fresh.fake_latent
    assert torch.equal(fresh.class_emb.weight, ema["class_emb.weight"])
    emigm.load_weights(fresh, ckpt, ema=False)
    assert torch.equal(fresh.class_emb.weight, raw["class_emb.weight"])


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        emigm.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*junk.pt as a checkpoint"):
        emigm.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no 'model'/'ema'/'model_ema' entry"):
        emigm.load_checkpoint(tmp_path / "other.pt")
    with torch.device("meta"):
        b, xs = emigm.EMIGM_models["B"](), emigm.EMIGM_models["XS"]()
    with pytest.raises(ValueError, match=r"checkpoint width 768, this model 448: pass --size B --img-size 256"):
        emigm.load_weights(xs, {"model_ema": b.state_dict()})
    with pytest.raises(ValueError, match="pass --no-ema"):
        emigm.load_weights(xs, {"model": xs.state_dict()})
