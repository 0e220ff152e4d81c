import math

import pytest
import torch
import torch.nn.functional as F

from ditscale.errors import CheckpointError, ConfigError, ModelInputError, WindowSpecError
from ditscale.model import DiT, DiT_models, create_model, load_reference_state_dict
from ditscale.model.attention import window_mask

REFERENCE_VARIANTS = [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]


def reference_shapes(depth, hidden, patch, in_channels=4, input_size=32, num_classes=1000, learn_sigma=True,
                     class_dropout_prob=0.1):  # fmt: skip
    """Parameter names and shapes of facebookresearch/DiT models.py, written from the architecture facts."""
    out_ch = in_channels * 2 if learn_sigma else in_channels
    n = (input_size // patch) ** 2
    sd = {
        "pos_embed": (1, n, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + int(class_dropout_prob > 0), hidden),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
            b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,),
        })  # fmt: skip
    sd.update({
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    })  # fmt: skip
    return sd


ARCH = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _meta(name, **kw):
    with torch.device("meta"):
        return DiT_models[name](input_size=kw.pop("input_size", 32), in_channels=kw.pop("in_channels", 4), **kw)


@pytest.mark.parametrize(
    "name,count",
    [("DiT-XL/2", 675_129_632), ("DiT-XL/4", 675_074_432), ("DiT-XL/8", 675_683_072), ("DiT-S/2", 32_963_360),
     ("DiT-B/2", 130_512_416), ("DiT-L/2", 458_102_816)],
)  # fmt: skip
def test_parameter_counts(name, count):
    m = _meta(name)
    assert sum(p.numel() for p in m.parameters()) == count


@pytest.mark.parametrize("name", REFERENCE_VARIANTS)
def test_reference_names_and_shapes(name):
    size, patch = name[4:].split("/")
    depth, hidden, _ = ARCH[size]
    m = _meta(name)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == reference_shapes(depth, hidden, int(patch))


def test_variants_table():
    for name in REFERENCE_VARIANTS + ["DiT-XL/1", "DiT-L/1", "DiT-B/1", "DiT-S/1", "DiT-XS/1", "DiT-T/1", "DiT-T/2"]:
        assert name in DiT_models
    xs = _meta("DiT-XS/1", in_channels=3)
    assert (xs.depth, xs.pos_embed.shape[-1], xs.num_heads, xs.patch_size) == (12, 252, 4, 1)
    t2 = _meta("DiT-T/2", in_channels=3)
    assert (t2.depth, t2.pos_embed.shape[-1], t2.num_heads, t2.patch_size) == (4, 96, 3, 2)


def _tiny(**kw):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=3, num_heads=3, num_classes=10)
    args.update(kw)
    return DiT(**args)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _inputs(model, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


def reference_forward(sd, x, t, y, *, patch, heads, depth, windows=None):
    """An independent functional re-statement of facebookresearch/DiT's forward pass (eval mode)."""
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    grid = h.shape[-1]
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], -1)
    temb = F.linear(F.silu(F.linear(tf, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])  # fmt: skip
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    B, N, D = h.shape
    for i in range(depth):
        p = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        a = F.layer_norm(h, (D,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = F.linear(a, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
        if windows is not None and windows[i] is not None:
            s = s.masked_fill(~window_mask(grid, grid, windows[i]), float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
        h = h + g1[:, None] * F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        m = F.layer_norm(h, (D,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        m = F.linear(F.gelu(F.linear(m, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])  # fmt: skip
        h = h + g2[:, None] * m
    mod = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    sh, sc = mod.chunk(2, dim=1)
    h = F.layer_norm(h, (D,), eps=1e-6) * (1 + sc[:, None]) + sh[:, None]
    h = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    C = h.shape[-1] // (patch * patch)
    h = h.reshape(B, grid, grid, patch, patch, C).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(B, C, grid * patch, grid * patch)


@pytest.mark.parametrize("windows", [None, [3, None, 5], [1, 3, 7]])
def test_forward_matches_functional_reference(windows):
    model = _randomize(_tiny(windows=windows, attention_backend="sdpa_mask")).eval()
    x, t, y = _inputs(model)
    ref = reference_forward(model.state_dict(), x, t, y, patch=2, heads=3, depth=3, windows=windows)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), ref, atol=1e-5, rtol=1e-5)


def test_initialisation_is_adaln_zero():
    model = _tiny()
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.abs().sum() == 0
        assert block.adaLN_modulation[-1].bias.abs().sum() == 0
    assert model.final_layer.linear.weight.abs().sum() == 0
    x, t, y = _inputs(model)
    out = model.eval()(x, t, y)
    assert out.shape == (4, 8, 8, 8) and out.abs().max() == 0
    assert not model.pos_embed.requires_grad
    pe = model.pos_embed[0]
    # MAE sin-cos: first quarter is sin(w * pos) over grid columns (token 0 is at column 0 -> 0), second quarter cos
    assert torch.allclose(pe[0, :12], torch.zeros(12)) and torch.allclose(pe[0, 12:24], torch.ones(12))
    assert torch.allclose(pe[1, 0], torch.tensor(math.sin(1.0)))  # token 1: column 1, frequency 1


def test_label_dropout_and_null_class():
    model = _tiny(class_dropout_prob=1.0)
    assert model.y_embedder.embedding_table.num_embeddings == 11
    y = torch.tensor([0, 3, 9])
    assert model.y_embedder.token_drop(y).tolist() == [10, 10, 10]
    emb_train = model.y_embedder(y, train=True)
    torch.testing.assert_close(emb_train, model.y_embedder.embedding_table.weight[[10, 10, 10]])
    emb_eval = model.y_embedder(y, train=False)
    torch.testing.assert_close(emb_eval, model.y_embedder.embedding_table.weight[y])
    forced = model.y_embedder(y, train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(forced, model.y_embedder.embedding_table.weight[[10, 3, 10]])
    assert _tiny(class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10


def test_forward_with_cfg_guides_first_three_channels():
    model = _randomize(_tiny()).eval()
    x, t, _ = _inputs(model, batch=2)
    x = torch.cat([x[:1], x[:1]])
    y = torch.tensor([4, 10])  # conditional half, null-class half
    t = torch.cat([t[:1], t[:1]])
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        raw = model(x, t, y)
    cond, uncond = raw[0], raw[1]
    expected_eps = uncond[:3] + 4.0 * (cond[:3] - uncond[:3])
    torch.testing.assert_close(out[0, :3], expected_eps)
    torch.testing.assert_close(out[1, :3], expected_eps)
    torch.testing.assert_close(out[:, 3:], raw[:, 3:])  # the 4th channel and the variance are not guided


def test_windowed_backends_agree_in_the_model():
    torch.manual_seed(0)
    outs, grads = [], []
    for backend in ("sdpa_mask", "halo"):
        model = _randomize(_tiny(input_size=16, windows="3,5,-", attention_backend=backend))
        x, t, y = _inputs(model, batch=2)
        out = model(x, t, y)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5 * grads[0].abs().max().item(), rtol=1e-4)


def _reference_state_dict(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    shapes = reference_shapes(3, 48, 2, in_channels=4, input_size=8, num_classes=10)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    sd["pos_embed"] = model.pos_embed.detach().clone()
    return sd


def test_load_reference_state_dict_strict_and_wrapped(tmp_path):
    model = _tiny()
    sd = _reference_state_dict(model)
    load_reference_state_dict(model, sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    x, t, y = _inputs(model)
    with torch.no_grad():
        ref = reference_forward(sd, x, t, y, patch=2, heads=3, depth=3)
        torch.testing.assert_close(model.eval()(x, t, y), ref, atol=1e-4, rtol=1e-4)
    # train.py checkpoints {"model", "ema", "opt", "args"} with DDP / compile prefixes, from a file
    other = _tiny()
    wrapped = {
        "model": {"module." + k: v * 0 for k, v in sd.items()},
        "ema": {"_orig_mod." + k: v for k, v in sd.items()},
        "opt": {},
        "args": None,
    }
    torch.save(wrapped, tmp_path / "0400000.pt")
    load_reference_state_dict(other, tmp_path / "0400000.pt")
    assert torch.equal(other.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    load_reference_state_dict(other, wrapped, prefer="model")
    assert other.blocks[0].attn.qkv.weight.abs().sum() == 0


def test_load_reference_state_dict_reports_mismatches(tmp_path):
    model = _tiny()
    sd = _reference_state_dict(model)
    del sd["blocks.2.mlp.fc2.bias"]
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(16)
    sd["final_layer.linear.weight"] = torch.zeros(16, 48)
    with pytest.raises(CheckpointError) as info:
        load_reference_state_dict(model, sd, source="DiT-XL-2-256x256.pt")
    msg = str(info.value)
    assert "DiT-XL-2-256x256.pt" in msg and "missing keys: blocks.2.mlp.fc2.bias" in msg
    assert "unexpected keys: blocks.0.attn.q_norm.weight" in msg
    assert "final_layer.linear.weight: checkpoint (16, 48) vs model (32, 48)" in msg
    with pytest.raises(CheckpointError, match="not found"):
        load_reference_state_dict(model, tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no model weights"):
        load_reference_state_dict(model, {"opt": {}, "args": None})


def test_bad_inputs_name_expected_and_given():
    model = _tiny().eval()
    x, t, y = _inputs(model, batch=2)
    with pytest.raises(ModelInputError, match=r"expected shape \(B, 4, 8, 8\).*got \(2, 4, 16, 16\)"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ModelInputError, match=r"in_channels=4.*got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ModelInputError, match=r"\[0, 9\].*got 11"):
        model(x, t, torch.tensor([1, 11]))
    with pytest.raises(ModelInputError, match="got -1"):
        model(x, t, torch.tensor([-1, 1]))
    with pytest.raises(ModelInputError, match=r"expected shape \(2,\)"):
        model(x, t, torch.tensor([1, 2, 3]))
    with pytest.raises(ModelInputError, match="timesteps"):
        model(x, t[:1], y)
    model(x, t, torch.tensor([10, 0]))  # the null class is a valid label


def test_window_spec_must_fit():
    with pytest.raises(WindowSpecError, match="'local\\*'.*depth 3"):
        _tiny(windows="local*")
    with pytest.raises(ConfigError, match="attention_backend"):
        _tiny(attention_backend="natten")


def test_create_model():
    m = create_model("DiT-T/2", input_size=8, in_channels=3, num_classes=10, windows="3x2@tail")
    assert m.windows == [None, None, 3, 3] and m.out_channels == 6 and m.num_classes == 10
    assert m.windows_spec == "3x2@tail"
    with pytest.raises(ConfigError, match="DiT-Q/2"):
        create_model("DiT-Q/2", input_size=8, in_channels=3, num_classes=10)


def test_capture_attention():
    model = _randomize(_tiny(windows=[3, None, None])).eval()
    x, t, y = _inputs(model, batch=2)
    with torch.no_grad():
        plain = model(x, t, y)
        with model.capture_attention(blocks=[0, 2]) as probs:
            captured_out = model(x, t, y)
    torch.testing.assert_close(captured_out, plain, atol=1e-5, rtol=1e-5)
    assert sorted(probs.keys()) == [0, 2] and 1 not in probs
    p0 = probs[0]
    assert p0.shape == (2, 3, 16, 16)
    torch.testing.assert_close(p0.sum(-1), torch.ones(2, 3, 16))
    assert (p0[..., ~window_mask(4, 4, 3)] == 0).all()
    assert (probs[2] > 0).all()
    assert all(b.attn._capture is None for b in model.blocks)
    with pytest.raises(ModelInputError):
        with model.capture_attention(blocks=[5]):
            pass


@pytest.mark.parametrize("backend", ["halo", "sdpa_mask"])
def test_low_precision(backend):
    # DeepSpeed bf16 converts the whole model; CPU autocast keeps fp32 weights
    model = _randomize(_tiny(input_size=32, patch_size=2, windows="3,-,5", attention_backend=backend))
    x, t, y = _inputs(model, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().square().mean().backward()
    assert torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()
    bf16 = model.to(torch.bfloat16)
    out16 = bf16(x.bfloat16(), t, y)
    assert out16.dtype == torch.bfloat16
    out16.float().square().mean().backward()
    assert torch.isfinite(bf16.blocks[0].attn.qkv.weight.grad.float()).all()


def test_forward_with_cfg_grey_images_guides_eps_only():
    model = _randomize(_tiny(in_channels=1)).eval()
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    t = torch.tensor([10, 10])
    y = torch.tensor([2, 10])
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=3.0)
        raw = model(x, t, y)
    torch.testing.assert_close(out[0, :1], raw[1, :1] + 3.0 * (raw[0, :1] - raw[1, :1]))
    torch.testing.assert_close(out[:, 1:], raw[:, 1:])  # the variance channel is not guided


def test_flops_per_image():
    # DiT-XL/2 on 32x32x4 latents: the DiT paper's 118.6 GFLOPs are multiply-adds, i.e. 237.2 GFLOP forward
    xl = _meta("DiT-XL/2")
    assert xl.flops_per_image(backward=False) == pytest.approx(2 * 118.6e9, rel=2e-3)
    assert xl.flops_per_image() == 3 * xl.flops_per_image(backward=False)
    # windows count only the keys each query sees (clipped at the border): fewer attention FLOPs, same linear ones
    g, w = _tiny(windows=None), _tiny(windows=[3, None, None])
    n, d = 16, 48  # 4x4 tokens; keys per query of a clipped 3x3 window on a 4x4 grid: (10/4)^2
    assert g.flops_per_image(False) - w.flops_per_image(False) == pytest.approx(2 * 2 * n * (n - 6.25) * d)
