"""Nothing ditscale reads besides a run's checkpoint runs code: exports, reference DiT checkpoints, diffusers
folders and FID Inception weights holding a crafted pickle (a __reduce__ that runs `touch MARKER`) are refused with
an error naming the file, and the marker proves the command never ran. The same payload does run when unpickled
the unsafe way, so each test's file is live."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch

from ditscale.errors import CheckpointError
from ditscale.model import DiT_models, load_exported, load_reference_state_dict, save_model
from tests.needs import import_or_fail

ARCH = dict(input_size=8, in_channels=4, num_classes=10)


class RunsCommand:
    """Unpickling this runs a shell command (what a hostile checkpoint does)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def crafted(marker: Path, kind: str) -> bytes:
    """A weights-looking file whose unpickling runs `touch marker`: torch.save's zip format or a bare pickle."""
    payload = {"x_embedder.proj.weight": torch.zeros(2), "evil": RunsCommand(f"touch {shlex.quote(str(marker))}")}
    if kind == "pickle":
        return pickle.dumps(payload, protocol=2)
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


@pytest.fixture(params=["torch.save", "pickle"])
def evil(request, tmp_path):
    """(file bytes, marker path); the payload is proved live once, with a marker of its own."""
    live = tmp_path / "payload-is-live"
    data = crafted(live, request.param)
    torch.load(io.BytesIO(data), weights_only=False) if request.param == "torch.save" else pickle.loads(data)
    assert live.exists(), "the crafted file must run its command when unpickled unsafely"
    marker = tmp_path / "MARKER"
    return crafted(marker, request.param), marker


def refused(fn, match: str, marker: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        fn()
    assert not marker.exists(), "the crafted file's command ran"
    msg = str(info.value)
    assert match in msg, msg
    return msg


def tiny(windows="3,3,-,-"):
    torch.manual_seed(0)
    return DiT_models["DiT-T/2"](**ARCH, windows=windows).eval()


def test_export_files_with_code_are_refused(tmp_path, evil):
    data, marker = evil
    # NAME.pt alone, and NAME.pt beside the genuine NAME.json of an export it replaced
    (tmp_path / "alone.pt").write_bytes(data)
    msg = refused(lambda: load_exported(tmp_path / "alone.pt"), "alone.pt", marker)
    assert "code or objects that are not tensors" in msg and "nothing in it was run" in msg
    paths = save_model(tiny(), tmp_path / "m.pt", variant="DiT-T/2")
    paths["pt"].write_bytes(data)
    refused(lambda: load_exported(paths["pt"]), "code or objects that are not tensors", marker)
    assert load_exported(tmp_path / "m").windows == [3, 3, None, None]  # m.json -> m.safetensors, still intact
    # a pickle named .safetensors is not parsed as a pickle at all
    paths["safetensors"].write_bytes(data)
    refused(lambda: load_exported(paths["safetensors"]), "not a safetensors file", marker)
    refused(lambda: load_exported(paths["json"]), "m.safetensors does not belong to the export", marker)
    (tmp_path / "m.pth").write_bytes(data)
    refused(lambda: load_exported(tmp_path / "m.pth"), "code or objects that are not tensors", marker)


def test_reference_checkpoint_with_code_is_refused_and_a_real_one_loads(tmp_path, evil):
    data, marker = evil
    (tmp_path / "DiT-XL-2-256x256.pt").write_bytes(data)
    msg = refused(lambda: load_reference_state_dict(tiny("global"), tmp_path / "DiT-XL-2-256x256.pt"),
                  "code or objects that are not tensors", marker)  # fmt: skip
    assert "DiT-XL-2-256x256.pt" in msg
    # facebookresearch/DiT train.py's checkpoint: {"model", "ema", "opt", "args"} with args an argparse.Namespace
    model = tiny("global")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([1])).sum().backward()
    opt.step()
    args = argparse.Namespace(model="DiT-T/2", image_size=64, global_batch_size=256, results_dir="results")
    sd = model.state_dict()
    torch.save({"model": sd, "ema": sd, "opt": opt.state_dict(), "args": args}, tmp_path / "0400000.pt")
    other = tiny("global")
    load_reference_state_dict(other, tmp_path / "0400000.pt")
    assert all(torch.equal(v, sd[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("layout", ["bin", "sharded-bin", "safetensors"])
def test_diffusers_folder_with_code_is_refused(tmp_path, evil, layout):
    import_or_fail("diffusers", "diffusers")
    from ditscale.interop.diffusers import from_diffusers, load_diffusers, save_diffusers

    data, marker = evil
    folder = save_diffusers(tiny(), tmp_path / "transformer")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    if layout == "bin":
        bad = folder / "diffusion_pytorch_model.bin"
    elif layout == "sharded-bin":
        bad = folder / "diffusion_pytorch_model-00002-of-00002.bin"
        torch.save({"pos_embed.proj.bias": torch.zeros(96)}, folder / "diffusion_pytorch_model-00001-of-00002.bin")
        index = {"weight_map": {"pos_embed.proj.bias": "diffusion_pytorch_model-00001-of-00002.bin",
                                "pos_embed.proj.weight": bad.name}}  # fmt: skip
        (folder / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        bad = folder / "diffusion_pytorch_model.safetensors"
    bad.write_bytes(data)
    match = "not a safetensors file" if layout == "safetensors" else "code or objects that are not tensors"
    for load in (load_diffusers, from_diffusers, load_exported):
        msg = refused(lambda f=load: f(folder), match, marker)
        assert bad.name in msg


def test_fid_inception_weights_with_code_are_refused(tmp_path, evil):
    from ditscale.eval.fid import load_inception

    data, marker = evil
    (tmp_path / "pt_inception.pth").write_bytes(data)
    msg = refused(lambda: load_inception(str(tmp_path / "pt_inception.pth")), "not tensors", marker)
    assert "Inception weights" in msg and "pt_inception.pth" in msg
