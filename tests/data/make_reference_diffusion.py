"""Write tests/data/reference_diffusion.pt: outputs of facebookresearch/DiT's own diffusion code.

    git clone https://github.com/facebookresearch/DiT /tmp/DiT   # written from ed81ce2229091fd4ecc9a223645f95cf379d582b
    python tests/data/make_reference_diffusion.py --dit /tmp/DiT
    python tests/data/make_reference_diffusion.py --dit /tmp/DiT --compare   # writes nothing: see below

Imports `diffusion` (create_diffusion, gaussian_diffusion.py, respace.py: DiT's copy of openai/improved-diffusion
and guided-diffusion) from the checkout, runs it on a toy model with fixed inputs, and stores inputs and outputs.
tests/test_diffusion_parity.py runs ditscale on the same inputs. Only torch and numpy are needed.

The stored outputs depend on the CPU they were computed on (the toy model's convolution rounds by instruction
set), so the test bounds the difference relative to the values' scale. `--compare` runs the reference and ditscale
side by side on this CPU and prints, per case, the max abs difference between them (0.0 expected: the same order
of operations) and between the reference here and the stored file (the CPU's share).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).with_name("reference_diffusion.pt")
C, H = 2, 4  # channels and side of the toy images


class ToyModel(nn.Module):
    """A small deterministic stand-in for a DiT: model(x, t, y) -> (B, out_ch, H, W), smooth in x, t and y."""

    def __init__(self, out_channels: int, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(C, out_channels, 3, padding=1)
        self.t_embed = nn.Linear(1, out_channels)
        self.y_embed = nn.Embedding(num_classes + 1, out_channels)

    def forward(self, x, t, y):
        emb = self.t_embed(t.float()[:, None] / 1000.0) + self.y_embed(y)
        return torch.tanh(self.conv(x) + emb[:, :, None, None])


def toy_models() -> dict[str, ToyModel]:
    torch.manual_seed(0)
    return {"sigma": ToyModel(2 * C).eval(), "plain": ToyModel(C).eval()}


def cond_fn(x, t, y=None):
    """A conditioning gradient that depends on the (base) timestep, so that a wrong timestep map shows."""
    return -0.3 * x * (t.float() / 1000.0).view(-1, 1, 1, 1) + 0.05


def denoised_fn(x0):
    return 0.9 * x0 + 0.01


# name -> create_diffusion keywords (the reference's), model
LOSS_CASES = {
    "default": ({}, "sigma"),
    "T500": ({"diffusion_steps": 500}, "sigma"),
    "T500_rescaled": ({"diffusion_steps": 500, "rescale_learned_sigmas": True}, "sigma"),
    "kl": ({"use_kl": True}, "sigma"),
    "kl_T250_fixed": ({"use_kl": True, "learn_sigma": False, "diffusion_steps": 250}, "plain"),
    "xstart": ({"predict_xstart": True}, "sigma"),
    "fixed": ({"learn_sigma": False}, "plain"),
    "fixed_small": ({"learn_sigma": False, "sigma_small": True}, "plain"),
    "cosine": ({"noise_schedule": "squaredcos_cap_v2"}, "sigma"),
}
# name -> respacing, create_diffusion keywords, model, loop, loop keywords (besides noise and model_kwargs), seed
SAMPLE_CASES = {
    "ddpm": ("10", {}, "sigma", "p", {}, 1),
    "ddpm_cond": ("10", {}, "sigma", "p", {"cond_fn": cond_fn}, 2),
    "ddpm_denoised_noclip": ("10", {}, "sigma", "p", {"denoised_fn": denoised_fn, "clip_denoised": False}, 3),
    "ddpm_T500_25": ("25", {"diffusion_steps": 500}, "sigma", "p", {}, 4),
    "ddpm_fixed_small": ("10", {"learn_sigma": False, "sigma_small": True}, "plain", "p", {}, 5),
    "ddpm_fixed_large": ("21", {"learn_sigma": False}, "plain", "p", {}, 6),
    "ddim": ("ddim10", {}, "sigma", "ddim", {}, 7),
    "ddim_cond": ("ddim10", {}, "sigma", "ddim", {"cond_fn": cond_fn}, 8),
    "ddim_eta": ("ddim10", {}, "sigma", "ddim", {"eta": 0.5}, 9),
    "ddim_xstart": ("ddim10", {"predict_xstart": True}, "sigma", "ddim", {}, 10),
}
REVERSE_STEPS = 5  # ddim_reverse_sample from t = 0 upwards on "ddim10", with cond_fn


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "x_start": torch.rand(3, C, H, H, generator=g) * 2 - 1,
        "noise": torch.randn(3, C, H, H, generator=g),
        "t": torch.tensor([0, 137, 999]),
        "t_small": torch.tensor([0, 77, 249]),  # for T = 250
        "t_500": torch.tensor([0, 77, 499]),  # for T = 500
        "y": torch.tensor([0, 2, 3]),  # 3 is the null class
    }


def loss_t(name: str, kw: dict, inp: dict) -> torch.Tensor:
    steps = kw.get("diffusion_steps", 1000)
    return {1000: inp["t"], 500: inp["t_500"], 250: inp["t_small"]}[steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dit", required=True, help="a facebookresearch/DiT checkout (its diffusion/ package is used)")
    ap.add_argument("--commit", default="", help="the checkout's commit, if it is not a git work tree")
    ap.add_argument("--compare", action="store_true", help="compare with ditscale on this CPU; write nothing")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.dit).resolve()))
    from diffusion import create_diffusion  # the reference

    try:
        rev = subprocess.run(["git", "-C", args.dit, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    except OSError:
        rev = ""
    rev = rev.strip() or args.commit
    models, inp = toy_models(), inputs()
    data = {"dit_commit": rev, "inputs": inp, "models": {k: m.state_dict() for k, m in models.items()}}
    kw_y = {"y": inp["y"]}

    losses = {}
    for name, (kw, model) in LOSS_CASES.items():
        d = create_diffusion("", **kw)
        with torch.no_grad():
            out = d.training_losses(models[model], inp["x_start"], loss_t(name, kw, inp), kw_y, noise=inp["noise"])
        losses[name] = {k: v.clone() for k, v in out.items()}
    data["losses"] = losses

    samples = {}
    for name, (respacing, kw, model, loop, loop_kw, seed) in SAMPLE_CASES.items():
        d = create_diffusion(respacing, **kw)
        torch.manual_seed(seed)  # the reference draws its noise from the global generator
        fn = d.p_sample_loop if loop == "p" else d.ddim_sample_loop
        samples[name] = fn(models[model], inp["noise"].shape, inp["noise"], model_kwargs=kw_y, **loop_kw)
    data["samples"] = samples

    d = create_diffusion("ddim10")
    x, rev_steps = inp["x_start"].clone(), []
    for i in range(REVERSE_STEPS):
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        with torch.no_grad():
            x = d.ddim_reverse_sample(models["sigma"], x, t, cond_fn=cond_fn, model_kwargs=kw_y)["sample"]
        rev_steps.append(x.clone())
    data["ddim_reverse"] = torch.stack(rev_steps)

    if args.compare:
        compare(data)
        return
    torch.save(data, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) from DiT {rev or '(unknown commit)'}")


def compare(here: dict) -> None:
    """Max abs differences per sampling case: reference vs ditscale on this CPU, and reference here vs stored."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from ditscale.diffusion import create_diffusion

    stored = torch.load(OUT, weights_only=True)
    models, inp = toy_models(), here["inputs"]
    for name, (respacing, kw, model, loop, loop_kw, seed) in SAMPLE_CASES.items():
        d = create_diffusion(respacing, **kw)
        fn = d.p_sample_loop if loop == "p" else d.ddim_sample_loop
        mine = fn(models[model], inp["noise"].shape, inp["noise"], model_kwargs={"y": inp["y"]},
                  generator=torch.Generator().manual_seed(seed), **loop_kw)  # fmt: skip
        ref, old = here["samples"][name].double(), stored["samples"][name].double()
        same_cpu = float((ref - mine.double()).abs().max())
        other_cpu = float((ref - old).abs().max())
        print(
            f"{name:22s} reference vs ditscale here {same_cpu:.3g}   "
            f"reference here vs stored {other_cpu:.3g} (scale {float(old.abs().max()):.3g})"
        )


if __name__ == "__main__":
    main()
