"""DiT under torch.compile: one graph per forward (no graph breaks: no host syncs, no untraceable Python), and a
fullgraph-compiled model (inductor, CPU) that matches eager in outputs and gradients."""

import pytest
import torch

from ditscale.cache import project_cache
from ditscale.model import DiT, autotune


def _model(windows, backend="auto", size=16, depth=3):
    torch.manual_seed(0)
    m = DiT(input_size=size, patch_size=1, in_channels=3, hidden_size=48, depth=depth, num_heads=2, num_classes=10,
            windows=windows, attention_backend=backend)  # fmt: skip
    with torch.no_grad():  # adaLN-Zero starts as the identity with a zero output: give every path some weight
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return m.eval()  # no label dropout: eager and compiled see the same labels


def _inputs(size=16, batch=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=g), torch.tensor([3, 999])[:batch], torch.tensor([1, 10])[:batch]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("DITSCALE_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(project_cache() / "inductor"))  # warm across test runs
    torch._dynamo.reset()
    autotune.forget()
    yield
    torch._dynamo.reset()


def _explain(fn, *args):
    e = torch._dynamo.explain(fn)(*args)
    return e.graph_count, [str(b.reason).splitlines()[0] for b in e.break_reasons]


@pytest.mark.parametrize("windows", [None, "3,5,-"])
def test_forward_and_cfg_have_no_graph_breaks(windows):
    model = _model(windows)  # 16 x 16 tokens: the halo tile is measured at trace time (a constant in the graph)
    x, t, y = _inputs()
    assert _explain(model, x, t, y) == (1, [])
    torch._dynamo.reset()
    assert _explain(model.forward_with_cfg, x, t, y, 4.0) == (1, [])
    if windows:  # measured while tracing (not written to disk on a loaded machine: look in this process's memory)
        assert any(key.startswith("halo|grid=16x16|k=3|heads=2|d=24") for key in autotune._CHOICES)


def test_flex_forward_has_no_graph_breaks():
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = _model("3,5,-", backend="flex")
    x, t, y = _inputs()
    with torch.no_grad():  # FlexAttention has no CPU backward
        assert _explain(model, x, t, y) == (1, [])


@pytest.mark.parametrize("windows", ["3,-"])  # a windowed and a global block in one model (the graph-break test
def test_fullgraph_compile_matches_eager(windows, monkeypatch):  # above covers the all-global model)
    monkeypatch.setenv("DITSCALE_HALO_TILE", "4")  # an 8x8 grid would fall back to dense: compile the halo kernel
    model = _model(windows, size=8, depth=2)
    x, t, y = _inputs(size=8)
    ref = model(x, t, y)
    ref.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, t, y)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)
    # the label check lives on in the graph as a device-side assert with the same message
    with pytest.raises(RuntimeError, match=r"expected class indices in \[0, 9\] \(or 10, the null class\)"):
        compiled(x, t, torch.tensor([1, 11]))
