"""Tests of the ablation paths of Fig. 2 against the official code
(testdata/emigm_ablation_reference.pt, ML-GSAI/eMIGM at de78623, semantics sec. 12): no MAE
(use_mae=False), MDM's weighting with t per row, an own [1, 1, D] mask token
(use_unsup_cfg=False), the linear schedule; and the official schedule names.
Run: python -m pytest -q test_ablation.py

Tolerances as in test_emigm.py (its docstring has the measurements): FP64_TOL for our fp64
evaluation against the official fp32 vectors (here measured at most 8.9e-7, the per-token losses;
their vb part 8.8e-6, under VB_TOL), FP32_TOL for our fp32 one (measured 0.0 but for the loss's
final sum, 1.6e-7).
"""
import math
from pathlib import Path

import pytest
import torch

import checkpoints
import emigm
import sample
# test_emigm's fixture one_thread applies here too (conftest.py restores the global state)
from test_emigm import DTYPES, TOL, VB_TOL, one_line, one_thread, rel_err  # noqa

HERE = Path(__file__).parent
# the file records the torch version it was made with
with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
    REF = torch.load(HERE / "testdata" / "emigm_ablation_reference.pt", weights_only=True)


def ablation_model(dtype=torch.float32, load=True):
    c = REF["config"]
    assert not c["use_mae"] and not c["use_unsup_cfg"] and c["use_weighted_loss"]
    model = emigm.EMIGM(seq_len=c["seq_len"], token_channels=c["token_embed_dim"],
                        width=c["encoder_embed_dim"], depth=c["encoder_depth"],
                        num_heads=c["encoder_num_heads"], head_depth=c["diffloss_d"],
                        head_width=c["diffloss_w"], num_classes=c["class_num"],
                        buffer_size=c["buffer_size"], mask_schedule=c["mask_strategy"],
                        t_min=c["clamp_t_min"], diffusion_batch_mul=c["diffusion_batch_mul"],
                        use_mae=False, loss_weighting="mdm", cfg_with_mask=False)
    if load:
        model.load_state_dict(REF["state_dict"], strict=True)
    return model.to(dtype).eval()


# ---- layout
def test_official_own_mask_token_layout_loads_strictly():
    """use_unsup_cfg=False: mask_token is an own [1, 1, D] Parameter beside the [1, D] fake_latent."""
    model = ablation_model(load=False)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    official = [(k, tuple(v.shape)) for k, v in REF["state_dict"].items()]
    assert ours == official  # keys, shapes, order
    assert model.mask_token.shape == (1, 1, 64) and model.fake_latent.shape == (1, 64)
    checkpoints.load_weights(model, {"model": REF["state_dict"]}, ema=False)
    assert torch.equal(model.mask_token, REF["state_dict"]["mask_token"])
    assert not torch.equal(model.mask_token[0], model.fake_latent)
    names = [n for n, _ in model.named_parameters()]
    assert "mask_token" in names and "fake_latent" in names


def test_mask_token_layouts_across_checkpoints():
    """An own-token checkpoint into a tied model is a one-line error that says what to build;
    our earlier own tokens, saved as [1, D], still load."""
    tied = emigm.EMIGM(**{**ablation_model(load=False).config, "cfg_with_mask": True})
    with pytest.raises(ValueError, match="cfg_with_mask=False") as e:
        checkpoints.load_weights(tied, {"model_ema": REF["state_dict"]})
    one_line(e)
    old = dict(REF["state_dict"])
    old["mask_token"] = old["mask_token"].reshape(1, 64)
    model = checkpoints.load_weights(ablation_model(load=False), {"ema": old})
    assert torch.equal(model.mask_token, REF["state_dict"]["mask_token"])
    assert old["mask_token"].shape == (1, 64)  # the caller's dict is left as it was


def test_mask_ratio_derivative_is_the_closed_form_in_any_grad_mode():
    """gamma'_t (MDM's weighting, Fig. 2b), by autograd of gamma_t, equals each schedule's
    closed form, also under no_grad and inference_mode (a loss computed in either)."""
    t = torch.linspace(0.01, 1, 100)
    e5 = math.exp(5.0)
    closed_forms = {"linear": torch.ones_like(t),
                    "cosine": math.pi / 2 * torch.sin(math.pi / 2 * (1 - t)),
                    "exp": 5 * torch.exp(-5 * t),
                    "log": (e5 - 1) / (5 * (1 + (e5 - 1) * t)),
                    "poly-0.5": 0.5 / torch.sqrt(t)}
    assert set(closed_forms) == set(emigm.SCHEDULES)
    for schedule, expected in closed_forms.items():
        for grad_mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            with grad_mode():
                derivative = emigm.mask_ratio_derivative(t, schedule)
            assert rel_err(derivative, expected) <= 1e-6


def test_official_schedule_names():
    assert "poly-0.5" in emigm.SCHEDULES and "log" in emigm.SCHEDULES
    t = torch.linspace(0.01, 1, 50)
    # 'poly0.5', our old spelling, still works
    assert torch.equal(emigm.mask_ratio(t, "poly-0.5"), emigm.mask_ratio(t, "poly0.5"))
    for schedule in ("poly-0.5", "poly0.5", "log"):
        model = emigm.EMIGM(seq_len=4, token_channels=2, width=8, depth=1, num_heads=2,
                            head_depth=1, head_width=8, num_classes=2, buffer_size=1,
                            mask_schedule=schedule)
        assert model.config["mask_schedule"] == schedule


# ---- equivalence
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["mask_a", "mask_b", "mask_full", "mask_none"])
def test_no_mae_encoder_decoder_match_official(case, dtype):
    model = ablation_model(dtype)
    inputs = REF["inputs"]
    class_emb = model.class_emb(inputs["labels"])
    mask = inputs[case].bool()
    with torch.no_grad():
        enc = model.forward_encoder(inputs["tokens"].to(dtype), mask, class_emb)
        z = model.forward_decoder(enc, mask)
    assert enc.shape == (4, 4 + 16, 64)  # every position goes through the encoder
    assert rel_err(enc, REF["mae"][f"{case}/cond/enc"]) <= TOL[dtype]
    assert rel_err(z, REF["mae"][f"{case}/cond/z"]) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_mae_cfg_batch_matches_official(dtype):
    model = ablation_model(dtype)
    inputs = REF["inputs"]
    ref = REF["mae"]
    class_emb = torch.cat([model.class_emb(inputs["labels"]), model.fake_latent.expand(4, -1)])
    assert rel_err(class_emb, ref["mask_a/cfg_batch/class_embedding"]) <= TOL[dtype]
    tokens = inputs["tokens"].repeat(2, 1, 1).to(dtype)
    mask = inputs["mask_a"].bool().repeat(2, 1)
    with torch.no_grad():
        enc = model.forward_encoder(tokens, mask, class_emb)
        z = model.forward_decoder(enc, mask)
    assert rel_err(enc, ref["mask_a/cfg_batch/enc"]) <= TOL[dtype]
    assert rel_err(z, ref["mask_a/cfg_batch/z"]) <= TOL[dtype]


def test_no_mae_masked_positions_hold_the_raw_mask_token():
    """Exact small case: with no encoder blocks the encoder output is encoder_norm(x), so every
    masked position is encoder_norm(mask_token): no position embedding, no z_proj_ln (official)."""
    config = {**ablation_model(load=False).config, "depth": 0}
    model = emigm.EMIGM(**config)
    model.load_state_dict(REF["state_dict"], strict=False)
    model.eval()
    mask = REF["inputs"]["mask_a"].bool()
    with torch.no_grad():
        class_emb = model.class_emb(REF["inputs"]["labels"])
        enc = model.forward_encoder(REF["inputs"]["tokens"], mask, class_emb)
        expected = model.encoder_norm(model.mask_token[0, 0])
    masked = enc[:, 4:][mask]
    assert torch.allclose(masked, expected.expand(len(masked), -1), rtol=0, atol=1e-6)
    assert (enc[:, 4:][~mask] - expected).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_weighted_loss_matches_official(dtype):
    """The official per-row path: t per row (p_mask constant along each row), unequal counts per
    row, loss = sum(l * w(p_row) * mask) / sum(mask) over the B * L * mul rows, w = 1/p (linear)."""
    model = ablation_model(dtype)
    ref = REF["full_forward"]
    mask = ref["mask"].bool()
    p = ref["p_mask"]
    assert (p == p[:, :1]).all() and len(set(mask.sum(1).tolist())) > 1
    # patchify: (B, C, h, w) -> (B, h*w, C)
    tokens = ref["imgs"].flatten(2).transpose(1, 2).to(dtype)
    noise = ref["noise"].to(dtype)
    mul = model.diffusion_batch_mul
    rows = mask.flatten().repeat(mul)  # the masked rows of the official (B*L tiled mul times)
    with torch.no_grad():
        loss = model(tokens, ref["labels"], mask=mask, t=p[:, 0], head_t=ref["t"], head_noise=noise)
        class_emb = model.class_emb(ref["labels"])
        z = model.forward_decoder(model.forward_encoder(tokens, mask, class_emb), mask)
        terms = model.diffloss(tokens[mask].repeat(mul, 1), z[mask].repeat(mul, 1),
                               ref["t"][rows], noise[rows])
    assert rel_err(loss, ref["loss"]) <= TOL[dtype]
    assert rel_err(terms["mse"], ref["loss_terms"]["mse"][rows]) <= TOL[dtype]
    assert rel_err(terms["vb"], ref["loss_terms"]["vb"][rows]) <= VB_TOL[dtype]
    # the same sum written out from the official per-row terms
    weights = (1 / p).flatten().repeat(mul)
    official_sum = (ref["loss_terms"]["loss"] * weights)[rows].sum() / rows.sum()
    assert rel_err(official_sum, ref["loss"]) <= TOL[torch.float32]


def test_teacher_forced_trace_matches_official(one_thread):
    """Replaying the official run's revealed positions and head noise gives its tokens. The
    transformer output z of every step is checked in fp32 and fp64; the sampled tokens (DPM-Solver,
    sample.py) in fp32 with test_sample's norm-relative 1e-5: measured 5.2e-7 against the official,
    and 4.4e-7 between fp32 and fp64 evaluations of the same steps (1 and 2 threads)."""
    models = {dtype: ablation_model(dtype) for dtype in DTYPES}
    tr = REF["sampler_trace"]
    B = tr["bsz"]
    steps = tr["steps"]
    interval = (tr["cfg_t_min"], tr["cfg_t_max"])
    guided = sample.cfg_steps(tr["num_iter"], tr["cfg"], interval).tolist()
    assert guided == [s["cfg_active"] for s in steps]
    model = models[torch.float32]
    class_emb = model.class_emb(tr["labels"])
    tokens = torch.zeros(B, 16, 16)
    mask = torch.ones(B, 16, dtype=torch.bool)
    for k, s in enumerate(steps):
        mask_in = torch.cat([mask, mask]) if guided[k] else mask
        assert torch.equal(mask_in.float(), s["mask_in"])
        for dtype, m in models.items():
            with torch.no_grad():
                class_emb_in = s["class_embedding_in"].to(dtype)
                enc = m.forward_encoder(s["tokens_in"].to(dtype), mask_in, class_emb_in)
                z = m.forward_decoder(enc, mask_in)
            assert rel_err(z, s["z"]) <= TOL[dtype]
        with torch.no_grad():
            tokens = sample.predict_revealed(model, tokens, mask, s["mask_to_pred"], class_emb,
                                             cfg=s["cfg_iter"], guided=guided[k],
                                             head_sampler="dpm-solver", head_steps=tr["dpm_steps"],
                                             noise=s["noise"])
        sampled = tokens[s["mask_to_pred"]]
        assert ((sampled - s["sampled"]).norm() / s["sampled"].norm()).item() <= 1e-5
        mask = mask & ~s["mask_to_pred"]
    final = tokens.transpose(1, 2).reshape(B, 16, 4, 4)
    ref = tr["final_tokens_unpatchified"]
    assert ((final - ref).norm() / ref.norm()).item() <= 1e-5


# ---- per-row masking
def test_per_row_masking_statistics():
    """t ~ U[0, 1) per row, no t_min, each token masked independently with probability
    gamma(t_row): the mean ratio is the integral of gamma over [0, 1] (linear: 0.5 + 0.5e-3),
    counts differ per row and rows with nothing masked occur (about 1/(L + 1) of them, linear).
    4000 rows of 16 tokens: the standard error of the mean ratio is 0.0048 (sd 0.31); 0.024 is 5."""
    g = torch.Generator().manual_seed(0)
    mask, t = emigm.sample_mask_per_row(4000, 16, "linear", generator=g)
    assert t.shape == (4000,) and t.min() >= 1e-3 and t.max() <= 1
    assert (t < 0.2).float().mean() > 0.15  # not truncated at t_min
    counts = mask.sum(1)
    assert abs(counts.float().mean().item() / 16 - (0.5 + 0.5e-3)) < 0.024
    assert (counts == 0).any() and len(set(counts.tolist())) > 10
    # each row's count follows its own t: high-t rows mask more
    high = t > 0.75
    low = t < 0.25
    assert counts[high].float().mean() > 3 * counts[low].float().mean()


@pytest.mark.parametrize("use_mae,weighting",
                         [(True, "constant"), (True, "mdm"), (False, "constant"), (False, "mdm")])
def test_forward_draws_t_per_row_only_without_mae_and_with_mdm(use_mae, weighting, monkeypatch):
    """The masks that forward draws: equal counts per row, at least 2 (one t for the batch),
    except with MDM's weighting and no MAE: counts differ between rows (official)."""
    model = emigm.EMIGM(seq_len=16, token_channels=2, width=8, depth=1, num_heads=2,
                        head_depth=1, head_width=8, num_classes=2, buffer_size=1,
                        use_mae=use_mae, loss_weighting=weighting, mask_schedule="linear")
    per_row = weighting == "mdm" and not use_mae
    assert model.per_row_masking == per_row
    masks = []
    encoder = model.forward_encoder

    def recording_encoder(tokens, mask, class_emb):
        masks.append(mask)
        return encoder(tokens, mask, class_emb)

    monkeypatch.setattr(model, "forward_encoder", recording_encoder)
    torch.manual_seed(0)
    for _ in range(5):
        loss = model(torch.randn(8, 16, 2), torch.arange(8) % 2)
        loss.backward()
        assert torch.isfinite(loss)
    counts = torch.stack(masks).sum(2)  # (5, B)
    assert (counts == counts[:, :1]).all().item() != per_row
    if not per_row:
        assert (counts >= 2).all()
