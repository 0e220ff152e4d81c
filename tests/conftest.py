"""Shared pytest setup. Service fixtures (S3, Slurm, Ray, Prometheus) live in tests/plugins/, one file each."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# DeepSpeed's CPU shm-comm op and inductor compile once per cache dir: keep them in the project cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".cache" / "inductor"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One ninja for every process (the venv's, a deepspeed dependency): ninja 1.11 and 1.13 disagree on .ninja_log and
# would rebuild the shared shm_comm op each time the other one ran it.
_venv_bin = str(Path(sys.executable).parent)
_path = os.environ.get("PATH", "")
if os.path.exists(os.path.join(_venv_bin, "ninja")) and not _path.startswith(_venv_bin + os.pathsep):
    os.environ["PATH"] = _venv_bin + os.pathsep + os.environ.get("PATH", "")

pytest_plugins = ["tests.plugins.s3", "tests.plugins.slurm", "tests.plugins.ray", "tests.plugins.prometheus"]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def digits8_dir(tmp_path_factory) -> Path:
    """Grey 8x8 shards of the embedded sklearn digits (train + test/), built once per session. Read-only: tests
    that damage shards build their own."""
    from ditscale.data import build_shards

    out = tmp_path_factory.mktemp("shared") / "digits8"
    build_shards("digits", None, str(out), resolution=8, channels=1, progress=False)
    return out


@pytest.fixture(scope="session")
def warm_deepspeed():
    """Build DeepSpeed's CPU shm_comm op once (~50 s the first time; cached in TORCH_EXTENSIONS_DIR)."""
    import subprocess

    from tests.ports import free_port

    port = free_port()
    code = (
        "import deepspeed, torch.distributed as d; deepspeed.init_distributed(dist_backend='gloo', "
        "auto_mpi_discovery=False, verbose=False); d.destroy_process_group()"
    )
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600, capture_output=True)
