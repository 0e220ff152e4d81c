"""Parity with facebookresearch/DiT's diffusion (itself openai/improved-diffusion and guided-diffusion).

Respacing is compared with the reference algorithm, copied below, for every section count. The losses, samplers
and conditioning functions are compared with outputs of the reference code stored in
tests/data/reference_diffusion.pt (written by tests/data/make_reference_diffusion.py from a DiT checkout).
"""

from __future__ import annotations

import random

import pytest

from ditscale.diffusion import space_timesteps


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
