"""Parity with facebookresearch/DiT's diffusion (itself openai/improved-diffusion and guided-diffusion).

Respacing is compared with the reference algorithm, copied below, for every section count. The losses, samplers
and conditioning functions are compared with outputs of the reference code stored in
tests/data/reference_diffusion.pt (written by tests/data/make_reference_diffusion.py from a DiT checkout).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from ditscale.diffusion import create_diffusion, space_timesteps
from ditscale.errors import ConfigError, ModelInputError
from tests.data import make_reference_diffusion as ref_data


# Copied from facebookresearch/DiT diffusion/respace.py @ ed81ce2 (= openai/improved-diffusion
# improved_diffusion/respace.py), unchanged but for the error messages: the reference algorithm.
def reference_space_timesteps(num_timesteps, section_counts):
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError("cannot create exactly that many steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        if section_count <= 1:
            frac_stride = 1
        else:
            frac_stride = (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


@pytest.mark.parametrize("T", [1000, 500])
def test_space_timesteps_equals_reference_for_every_count(T):
    for count in range(1, T + 1):
        assert space_timesteps(T, str(count)) == reference_space_timesteps(T, str(count)), count
    # counts where rounding j * stride (ditscale before) kept another step than the reference's running sum
    if T == 1000:
        assert 499 in space_timesteps(1000, "21") and 500 not in space_timesteps(1000, "21")
    else:
        assert 249 in space_timesteps(500, "25") and 250 not in space_timesteps(500, "25")


@pytest.mark.parametrize("T", [1000, 500])
def test_space_timesteps_equals_reference_for_sections_and_ddim(T):
    rng = random.Random(T)
    specs = ["10,15,20", "1,1", "3,1,4,1,5", "250,250", "100,1,100"]
    for _ in range(300):
        n = rng.randint(2, 6)
        specs.append(",".join(str(rng.randint(1, T // n)) for _ in range(n)))
    for spec in specs:
        assert space_timesteps(T, spec) == reference_space_timesteps(T, spec), spec
        assert space_timesteps(T, [int(c) for c in spec.split(",")]) == reference_space_timesteps(T, spec), spec
    checked = 0
    for n in range(1, T + 1):
        try:
            want = reference_space_timesteps(T, f"ddim{n}")
        except ValueError:
            continue
        assert space_timesteps(T, f"ddim{n}") == want, n
        checked += 1
    assert checked > 20


# ------------------------------------------------------------------------------- losses and samplers vs the reference

REF_FILE = Path(__file__).parent / "data" / "reference_diffusion.pt"


@pytest.fixture(scope="module")
def ref():
    data = torch.load(REF_FILE, weights_only=True)
    models = ref_data.toy_models()
    for name, m in models.items():
        m.load_state_dict(data["models"][name])
    data["toy"] = models
    return data


def _maxdiff(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


# The stored outputs were computed on one CPU (an AVX-512 Xeon); the toy model's convolution rounds differently on
# another (oneDNN picks kernels by instruction set), while ditscale and the reference run on the same CPU agree
# exactly (make_reference_diffusion.py --compare). So the bound is float32 rounding relative to the values' scale:
# 1e-5 of max(1, |reference|), e.g. 2.3e-5 on samples near 216 (1.1e-7 relative) on an AMD EPYC.
def _close(got, want) -> bool:
    return _maxdiff(got, want) <= 1e-5 * max(1.0, float(want.detach().abs().max()))


@pytest.mark.parametrize("case", list(ref_data.LOSS_CASES))
def test_training_losses_equal_reference(ref, case):
    kw, model = ref_data.LOSS_CASES[case]
    inp = ref["inputs"]
    d = create_diffusion("", **kw)  # the reference's keywords, unchanged
    with torch.no_grad():
        out = d.training_losses(
            ref["toy"][model], inp["x_start"], ref_data.loss_t(case, kw, inp), dict(y=inp["y"]), inp["noise"]
        )
    want = ref["losses"][case]
    assert set(want) <= set(out), (case, set(want), set(out))
    for key, value in want.items():
        assert _close(out[key], value), (case, key, _maxdiff(out[key], value))


def test_rescale_vb_is_the_reference_rescale_learned_sigmas(ref):
    inp, model = ref["inputs"], ref["toy"]["sigma"]
    args = (model, inp["x_start"], inp["t_500"], dict(y=inp["y"]), inp["noise"])
    with torch.no_grad():
        plain = create_diffusion(diffusion_steps=500).training_losses(*args)
        scaled = create_diffusion(diffusion_steps=500, rescale_vb=True).training_losses(*args)
    assert torch.allclose(scaled["vb"], plain["vb"] * 0.5)
    assert _close(scaled["loss"], ref["losses"]["T500_rescaled"]["loss"])
    assert _close(plain["loss"], ref["losses"]["T500"]["loss"])
    with pytest.raises(ConfigError, match="one switch"):
        create_diffusion(rescale_learned_sigmas=True, rescale_vb=False)


@pytest.mark.parametrize("case", list(ref_data.SAMPLE_CASES))
def test_sampling_loops_equal_reference(ref, case):
    respacing, kw, model, loop, loop_kw, seed = ref_data.SAMPLE_CASES[case]
    inp = ref["inputs"]
    d = create_diffusion(respacing, **kw)
    fn = d.p_sample_loop if loop == "p" else d.ddim_sample_loop
    # the reference draws from the global generator; a generator seeded alike gives the same noise
    got = fn(ref["toy"][model], inp["noise"].shape, inp["noise"], model_kwargs=dict(y=inp["y"]),
             generator=torch.Generator().manual_seed(seed), **loop_kw)  # fmt: skip
    assert _close(got, ref["samples"][case]), (case, _maxdiff(got, ref["samples"][case]))


def test_sampling_loops_take_the_reference_positional_arguments(ref):
    inp, model = ref["inputs"], ref["toy"]["sigma"]
    d = create_diffusion("10")
    g = torch.Generator().manual_seed(2)
    # (model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress)
    got = d.p_sample_loop(model, inp["noise"].shape, inp["noise"], True, None, ref_data.cond_fn, dict(y=inp["y"]),
                          "cpu", False, generator=g)  # fmt: skip
    assert _close(got, ref["samples"]["ddpm_cond"])
    d = create_diffusion("ddim10")
    got = d.ddim_sample_loop(model, inp["noise"].shape, inp["noise"], True, None, ref_data.cond_fn,
                             dict(y=inp["y"]), None, False, 0.0)  # fmt: skip
    assert _close(got, ref["samples"]["ddim_cond"])
    # the reference's default device is the model's: no noise given, nothing else says where to sample
    out = d.ddim_sample_loop(model, (1, 2, 4, 4), model_kwargs=dict(y=torch.tensor([1])))
    assert out.device == next(model.parameters()).device
    # ditscale's loops took (noise, model_kwargs, ...) before: a dict in clip_denoised's place says so
    with pytest.raises(ModelInputError, match="model_kwargs=... by keyword"):
        d.ddim_sample_loop(model, inp["noise"].shape, inp["noise"], dict(y=inp["y"]))


def test_ddim_reverse_sample_equals_reference(ref):
    inp, model = ref["inputs"], ref["toy"]["sigma"]
    d = create_diffusion("ddim10")
    x = inp["x_start"].clone()
    for i in range(ref_data.REVERSE_STEPS):
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        x = d.ddim_reverse_sample(model, x, t, True, None, ref_data.cond_fn, dict(y=inp["y"]))["sample"]
        assert _close(x, ref["ddim_reverse"][i]), i
    with pytest.raises(ConfigError, match="eta"):
        d.ddim_reverse_sample(model, x, t, model_kwargs=dict(y=inp["y"]), eta=0.5)


def test_ddim_reverse_then_forward_recovers_the_input():
    # DDIM inversion with an exact (oracle) model and no clipping: forward DDIM from the inverted latent lands back.
    d = create_diffusion("ddim20")
    x0 = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.6 - 0.8
    ab = torch.tensor(d.alphas_cumprod, dtype=torch.float64)

    def oracle(x, t):
        a = ab[torch.tensor([d.timestep_map.index(int(s)) for s in t])].view(-1, 1, 1, 1)
        return torch.cat([(x - a.sqrt() * x0) / (1 - a).sqrt(), torch.zeros_like(x)], 1)

    x = x0
    for i in range(d.num_timesteps):
        x = d.ddim_reverse_sample(oracle, x, torch.full((2,), i), clip_denoised=False)["sample"]
    assert torch.allclose(d.ddim_sample_loop(oracle, x0.shape, x, clip_denoised=False), x0, atol=1e-8)


def test_sample_uses_the_runs_diffusion_settings(ref):
    from ditscale.diffusion import diffusion_kwargs, sample

    class Labelled(torch.nn.Module):  # the toy model with the attributes sample() reads
        in_channels, input_size, num_classes, learn_sigma = 2, 4, 3, True

        def __init__(self, toy):
            super().__init__()
            self.toy = toy

        def forward(self, x, t, y):
            return self.toy(x, t, y)

    model, noise, labels = Labelled(ref["toy"]["sigma"]), ref["inputs"]["noise"], torch.tensor([0, 1, 2])
    got = sample(model, labels, steps=10, method="ddim", noise=noise, predict_xstart=True, clip_denoised=False)
    want = create_diffusion("10", predict_xstart=True).ddim_sample_loop(
        model, noise.shape, noise, clip_denoised=False, model_kwargs=dict(y=labels)
    )
    assert torch.equal(got, want)
    from ditscale.config import load_config

    kw = diffusion_kwargs(load_config(None, ["diffusion.predict_xstart=true", "model.learn_sigma=true"]))
    assert kw["predict_xstart"] is True
    assert torch.equal(sample(model, labels, steps=10, method="ddim", noise=noise, clip_denoised=False, **kw), want)
    with pytest.raises(ConfigError, match="learn_sigma"):
        sample(model, labels, steps=10, learn_sigma=False)
