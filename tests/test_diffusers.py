"""diffusers interop, on tiny random models built here (no downloads): export to a DiTTransformer2DModel folder,
equal outputs, windowed blocks through ditscale's attention processor, a DiTPipeline from local parts, and import
of a diffusers DiT folder into ditscale."""

from __future__ import annotations

import pytest
import torch

from tests.needs import import_or_fail

diffusers = import_or_fail("diffusers", "diffusers")

from ditscale.diffusion import create_diffusion, randn  # noqa: E402
from ditscale.errors import CheckpointError  # noqa: E402
from ditscale.interop.diffusers import (  # noqa: E402
    WindowAttnProcessor,
    apply_ditscale,
    from_diffusers,
    load_diffusers,
    save_diffusers,
)
from ditscale.model import DiT_models, load_exported  # noqa: E402

ARCH = dict(input_size=8, in_channels=4, num_classes=10)  # DiT-T/2: a 4x4 token grid, SD-VAE-like 4 channels


def tiny(windows="global", seed=0, **kw):
    torch.manual_seed(seed)
    model = DiT_models["DiT-T/2"](**{**ARCH, **kw}, windows=windows)
    with torch.no_grad():  # random weights everywhere (adaLN-Zero would make the output 0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 500, 999]), torch.tensor([1, 9, 10])


def run(transformer, x, t, y):
    with torch.no_grad():
        return transformer(x, timestep=t, class_labels=y).sample


def maxdiff(a, b) -> float:
    return float((a - b).abs().max())


def test_global_export_loads_in_plain_diffusers(tmp_path):
    model = tiny()
    save_diffusers(model, tmp_path / "transformer")
    stock, info = diffusers.DiTTransformer2DModel.from_pretrained(
        tmp_path / "transformer", low_cpu_mem_usage=False, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    x, t, y = inputs()
    with torch.no_grad():
        want = model(x, t, y)
    got = run(stock.eval(), x, t, y)
    # diffusers' timestep frequencies differ from the reference's (downscale_freq_shift 1 vs 0): the same at t = 0
    assert maxdiff(got[0], want[0]) <= 1e-5
    # ... and exact once the reference's embedding is installed (load_diffusers does it for ditscale's folders)
    assert maxdiff(run(apply_ditscale(stock), x, t, y), want) <= 1e-5
    assert maxdiff(run(load_diffusers(tmp_path / "transformer"), x, t, y), want) <= 1e-5


def test_windowed_model_runs_in_diffusers_through_ditscale_processor(tmp_path):
    model = tiny("3,5,-,3")
    save_diffusers(model, tmp_path / "w")
    transformer = load_diffusers(tmp_path / "w")
    assert transformer.config.ditscale_windows == [3, 5, None, 3]
    procs = [b.attn1.processor for b in transformer.transformer_blocks]
    assert [p.window if isinstance(p, WindowAttnProcessor) else None for p in procs] == [3, 5, None, 3]
    x, t, y = inputs()
    with torch.no_grad():
        want = model(x, t, y)
    assert maxdiff(run(transformer, x, t, y), want) <= 1e-5
    for backend in ("sdpa_mask", "halo"):
        assert maxdiff(run(load_diffusers(tmp_path / "w", backend=backend), x, t, y), want) <= 1e-5
    # and back: the folder alone rebuilds the windowed ditscale model
    back = load_exported(tmp_path / "w")
    assert back.windows == [3, 5, None, 3]
    with torch.no_grad():
        assert maxdiff(back(x, t, y), want) == 0.0


def test_dit_pipeline_from_local_parts_generates_ditscales_samples(tmp_path):
    model = tiny()
    save_diffusers(model, tmp_path / "transformer")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        sample_size=16,
    ).eval()  # fmt: skip
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
    )  # fmt: skip
    pipe = diffusers.DiTPipeline(transformer=load_diffusers(tmp_path / "transformer"), vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = [1, 7]
    out = pipe(labels, guidance_scale=1.0, num_inference_steps=10, output_type="pt",
               generator=torch.Generator().manual_seed(5)).images  # fmt: skip
    assert out.shape == (2, 3, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1

    # ditscale: DDIM over "ddim10" (= the scheduler's leading spacing 0, 100, ..., 900) from the same noise
    noise = randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    latents = create_diffusion("ddim10").ddim_sample_loop(
        model, noise.shape, noise, clip_denoised=False, model_kwargs=dict(y=torch.tensor(labels))
    )
    with torch.no_grad():
        images = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert maxdiff(out, images) <= 1e-4  # diffusers keeps the schedule in float32


def _native_diffusers_dit(tie: bool):
    """A DiTTransformer2DModel made in diffusers (random init), the embedders tied as in converted checkpoints."""
    torch.manual_seed(3)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=3, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=4, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6,
    )  # fmt: skip
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if tie:
            first = transformer.transformer_blocks[0].norm1.emb.state_dict()
            for block in transformer.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first)
    return transformer.eval()


def test_a_diffusers_dit_folder_imports_into_ditscale(tmp_path):
    transformer = _native_diffusers_dit(tie=True)
    transformer.save_pretrained(tmp_path / "pipe" / "transformer")
    model = from_diffusers(tmp_path / "pipe")  # a pipeline folder: its transformer/
    assert (model.depth, model.num_heads, model.patch_size, model.in_channels, model.learn_sigma) == (4, 3, 2, 4, True)
    x, t, y = inputs()
    with torch.no_grad():
        got = model(x, t, y)
    # the imported model computes the reference DiT: diffusers' model with the reference's timestep embedding
    assert maxdiff(got, run(apply_ditscale(transformer, timestep_embedding="dit"), x, t, y)) <= 1e-5
    untied = _native_diffusers_dit(tie=False)
    with pytest.raises(CheckpointError, match="block 1's .* differs from block 0's"):
        from_diffusers(untied)


def test_class_dropout_zero_round_trip(tmp_path):
    model = tiny(class_dropout_prob=0.0)
    save_diffusers(model, tmp_path / "t")
    back = load_exported(tmp_path / "t")
    assert back.y_embedder.embedding_table.num_embeddings == 10
    x, t, y = inputs()
    y = y.clamp(max=9)
    with torch.no_grad():
        assert maxdiff(back(x, t, y), model(x, t, y)) == 0.0
