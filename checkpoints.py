"""Loading eMIGM weights (You et al. 2025, arXiv 2503.07197):
- our checkpoints: plain dicts written by train.py;
- the official ones (ML-GSAI/eMIGM at de78623), whose EMA quirk is kept.
Each is checked against the model's architecture; a mismatch is a one-line
error that names the flags to pass. Used by sample.py, train.py and study.py.
Tests: python -m pytest -q test_emigm.py"""
import argparse

import torch

from emigm import SIZES, create_emigm

def config_from_state_dict(state):
    """The architecture fields of EMIGM read off a state_dict (ours or official)."""
    seq_len = state["diffusion_pos_embed_learned"].shape[1]
    blocks = [k for k in state if k.endswith(".norm1.weight")]
    encoder = [k for k in blocks if k.startswith("encoder_blocks.")]
    decoder = [k for k in blocks if k.startswith("decoder_blocks.")]
    head = [k for k in state if k.endswith(".in_ln.weight")]
    return dict(width=state["fake_latent"].shape[1], seq_len=seq_len,
                token_channels=state["z_proj.weight"].shape[1],
                depth=len(encoder), decoder_depth=len(decoder), head_depth=len(head),
                head_width=state["diffloss.net.input_proj.weight"].shape[0],
                num_classes=state["class_emb.weight"].shape[0],
                buffer_size=state["encoder_pos_embed_learned"].shape[1] - seq_len)

def size_of(config):
    """The flags of the preset of that architecture (config_from_state_dict)."""
    for name in SIZES:
        for img_size in SIZES[name]["head"]:
            with torch.device("meta"):  # shapes only: no memory, no time
                preset = create_emigm(name, img_size)
            if config_from_state_dict(preset.state_dict()) == config:
                return f"--size {name} --img-size {img_size}"
    return "the checkpoint's own architecture"

def load_checkpoint(path):
    """Ours or an official one, weights_only (+ the official files' argparse.Namespace)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}: pass an eMIGM .pth/.pt") from None
    except Exception as error:  # not a torch file, truncated, or unsafe
        reason = " ".join(str(error).split())[:200]
        raise ValueError(f"cannot read {path} as a checkpoint ({reason}): pass an eMIGM "
                         f"checkpoint saved by train.py or the official code") from None
    weights = {"model", "ema", "model_ema"}
    if not isinstance(checkpoint, dict) or not weights & set(checkpoint):
        raise ValueError(f"{path} has no 'model'/'ema'/'model_ema': "
                         f"pass an eMIGM checkpoint")
    return checkpoint

def load_weights(model, checkpoint, ema=True):
    """Load the EMA (default) or raw weights: ours {'model', 'ema'}, official {'model',
    'model_ema'}. Official EMA quirk (semantics sec. 2): model_ema has the EMA value under
    'fake_latent', the RAW one under 'mask_token'; both are copied, in that order, into
    the one tied Parameter: the raw value wins, here too."""
    names = ("ema", "model_ema") if ema else ("model",)
    found = [k for k in names if k in checkpoint]
    if not found:
        hint = "is it an eMIGM checkpoint?"
        if ema:
            hint = "pass --no-ema to use the raw weights"
        raise ValueError(f"checkpoint has no {' or '.join(names)} entry "
                         f"(it has {sorted(checkpoint)}); {hint}")
    state = checkpoint[found[0]]
    ours = config_from_state_dict(model.state_dict())
    try:
        theirs = config_from_state_dict(state)
    except KeyError as error:
        raise ValueError(f"checkpoint has no {error}: pass an eMIGM checkpoint") from None
    for field in ours:
        if ours[field] != theirs[field]:
            raise ValueError(f"checkpoint {field.replace('_', ' ')} {theirs[field]}, "
                             f"this model {ours[field]}: pass {size_of(theirs)}")
    # an own mask token is [1, 1, D] (official); our earlier files stored it as [1, D]
    if model.mask_token is not model.fake_latent:
        state = {**state, "mask_token": state["mask_token"].reshape(1, 1, -1)}
    elif state["mask_token"].dim() == 3:
        raise ValueError("the checkpoint has its own mask token (no CFG with mask, "
                         "Fig. 2e): build the model with cfg_with_mask=False "
                         "(train.py --no-cfg-with-mask)")
    model.load_state_dict(state, strict=True)
    return model
