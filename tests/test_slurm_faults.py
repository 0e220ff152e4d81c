"""launchers/slurm_grid.py under faults, against the REAL 2-node Slurm of tests/plugins/slurm.py.

- submit-time checks: Slurm's time formats, a time limit that leaves little or no training, GPUs or nodes the
  partition does not have, a job array sbatch refuses (no stray pickle), a run dir held by a live trainer;
- the failure budget (`--max-failures`) decided once per job life, and a job script whose only rank was killed
  requeued by the job script itself (after srun);
- end to end with one 2-node run (DiT-T/2, CPU, gloo): a real Prometheus configured only with the grid's file_sd
  targets scrapes both ranks; the same grid submitted again with another --log-dir is refused; a paused rank shows
  as stalled; node n2 dies (slurmd, slurmstepd and task killed): the job is requeued by the surviving rank, and
  once n2 is back it resumes from its checkpoint and finishes; raising train.steps submits it again and it
  continues, and when its time-outs are used up it ends with one line and stays resumable.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ditscale.errors import LaunchError
from ditscale.launch import claim as C
from ditscale.launch import records
from ditscale.launch import slurm as S
from ditscale.launch import task as T
from tests.ports import free_port
from tests.waits import wait_for

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "grids" / "digits-test.yaml"
LAUNCHER = ROOT / "launchers" / "slurm_grid.py"
RUN2 = "digits-t2-3x2@head-nodes2"


def launcher(*args, env=None, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
        cwd=ROOT,
    )  # fmt: skip


def _queue(cluster) -> str:
    return cluster.run("squeue", "-h", "-o", "%i").stdout.strip()


def _two_node_grid(tmp_path: Path) -> Path:
    """The digits test grid with its 2-node run only (one trainer less on a 2-core machine)."""
    text = GRID.read_text().replace("values: [1, 2], prefix: nodes", "values: [2], prefix: nodes")
    assert text != GRID.read_text()
    p = tmp_path / "digits-2node.yaml"
    p.write_text(text)
    return p


# --- no training --------------------------------------------------------------------------------------------
def test_parse_time_slurm_formats():
    cases = {"30": 30, "5:30": 6, "1:00:00": 60, "0:30:00": 30, "1-00": 1440, "1-2:30": 1590, "1-00:00:30": 1441,
             "2-00:00:00": 2880}  # fmt: skip
    assert {t: S.parse_time(t) for t in cases} == cases
    for bad in ("abc", "1:2:3:4", "-5", "1-", "0"):
        with pytest.raises(LaunchError, match=r"--time '"):
            S.parse_time(bad)


def test_failure_budget_is_decided_once_per_job_life(tmp_path, monkeypatch):
    """handle_failure: requeue while failures <= max_failures, then give up; one decision per job life."""
    calls = []
    monkeypatch.setattr(T, "job_state", lambda job: "RUNNING")
    monkeypatch.setattr(T.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    (tmp_path / T.TARGETS).mkdir()
    (tmp_path / T.TARGETS / "r-rank1.json").write_text("[]")
    actions = []
    for restart in range(3):
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        actions.append(T.handle_failure(tmp_path, "7_1", "r", "rank 1: RuntimeError: peer lost", max_failures=2))
        assert T.handle_failure(tmp_path, "7_1", "r", "rank 0: the same failure", max_failures=2) is None
    assert actions == ["requeued", "requeued", "gave up"]
    assert calls == [["scontrol", "requeue", "7_1"]] * 2
    assert [r["failure"] for r in T.failure_records(tmp_path, "7_1")] == [1, 2, 3]
    assert not list((tmp_path / T.TARGETS).iterdir()), "a run that gave up keeps no file_sd target"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert T.handle_failure(tmp_path, "8", "q", "ConfigError: changed", max_failures=2, retry=False) == "not retried"
    monkeypatch.setattr(T, "job_state", lambda job: "COMPLETING")  # Slurm is requeueing or cancelling it already
    monkeypatch.setenv("SLURM_RESTART_COUNT", "5")
    assert T.handle_failure(tmp_path, "7_1", "r", "killed by the requeue", max_failures=9) is None


@pytest.mark.slow
@pytest.mark.slurm
def test_submit_time_checks(slurm_cluster, digits8_dir, tmp_path):
    common = ["--partition", "gpu", "--grid", GRID, "--var", f"data_root={digits8_dir}", "--run-root", tmp_path]
    r = launcher(*common, "--dry-run", "--time", "1-00:00:00")
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --time=1440" in r.stdout and "--kill-on-bad-exit=1" in r.stdout
    r = launcher(*common, "--dry-run", "--time", "abc")
    assert r.returncode == 2 and "error: --time 'abc': not a Slurm time" in r.stderr and "Traceback" not in r.stderr
    r = launcher(*common, "--dry-run", "--time", "3")
    assert r.returncode == 0 and "warning: --time 3 min" in r.stderr and "about 1 min of training" in r.stderr
    r = launcher(*common, "--dry-run", "--time", "2")
    assert r.returncode == 2 and "leaves no time to train" in r.stderr
    for mode in (["--dry-run"], []):  # the dry run checks what the submission checks
        r = launcher(*common, *mode, "--gpus-per-node", "4", "--nodes", "3")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "4 requests cannot fit partition 'gpu'" in r.stderr
        for run in ("digits-t2-3x2@head-nodes1", RUN2):
            assert f"run '{run}': 4 GPUs per node asked (--gpus-per-node)" in r.stderr
            assert f"run '{run}': 3 nodes asked (--nodes), partition 'gpu' has 2" in r.stderr
    assert _queue(slurm_cluster) == "" and not (tmp_path / "_slurm").exists()

    # a run dir held by a live trainer (this process) is not submitted, whatever the launcher's own records say
    from ditscale.io.lock import Lease

    held = tmp_path / "digits-t2-3x2@head-nodes1"
    held.mkdir()
    with Lease(str(held / "lock.json"), lease_s=120):
        r = launcher(*common, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "1 queued or running elsewhere, 1 to submit" in r.stdout
    assert f"skip: held by a live trainer (pid {os.getpid()}" in r.stdout

    # sbatch refuses the array: a named error, and submitit's pickles do not stay behind
    from ditscale.launch.common import plan_grid

    plan = plan_grid(str(GRID), vars={"data_root": str(digits8_dir)}, run_root=str(tmp_path / "refused"))
    opts = S.SlurmOptions(partition="gpu", log_dir=tmp_path / "refused" / "_slurm", constraint="nosuchfeature")
    from ditscale.launch.backend import launch

    with pytest.raises(LaunchError, match=r"sbatch refused the job array of digits-t2-3x2@head-nodes1: .*feature"):
        launch(S.SlurmBackend(opts), plan, launch_record=plan.launch)
    left = [p for p in opts.log_dir.rglob("*") if p.is_file() and p.parent.name != "launches"]
    assert not left, left
    assert not records.jobs(opts.log_dir)  # the launch record names no job
    claims = C.current([r.run_dir for r in plan.runs])
    assert all(c is not None and c.ended for c in claims.values())  # the refused runs are free again
    assert _queue(slurm_cluster) == ""


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.slurm
def test_job_script_requeues_a_step_no_rank_could_report(slurm_cluster, tmp_path):
    """The only rank is killed (OOM, a node's kernel): srun fails, the job script requeues within the budget."""
    import submitit

    opts = S.SlurmOptions(partition="gpu", log_dir=tmp_path, max_failures=1)
    params = {"partition": "gpu", "nodes": 1, "ntasks_per_node": 1, "cpus_per_task": 1, "time": 5,
              "additional_parameters": {"requeue": True}, "srun_args": ["--kill-on-bad-exit=1"],
              "teardown": S.teardown_lines(opts)}  # fmt: skip
    ex = submitit.SlurmExecutor(folder=str(tmp_path / "%j"))
    ex.update_parameters(**params)
    job = ex.submit(_die).job_id

    def decisions():
        return T.failure_records(tmp_path, job)

    wait_for("the first failure", lambda: len(decisions()) == 1, 120, slurm_cluster)
    assert decisions()[0]["action"] == "requeued" and "srun exited with code" in decisions()[0]["reason"]
    wait_for("the requeued job pending", lambda: slurm_cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout
             .strip() == "PENDING", 120, slurm_cluster)  # fmt: skip
    slurm_cluster.start_now(job)
    wait_for("the second failure", lambda: len(decisions()) == 2, 120, slurm_cluster)
    assert decisions()[1]["action"] == "gave up"
    wait_for("the job to end", lambda: job not in _queue(slurm_cluster).split(), 60, slurm_cluster)


# --- end to end ---------------------------------------------------------------------------------------------
def _run_procs(cluster, job: str) -> dict[str, int]:
    """node -> pid of the run's task there (the python process srun started)."""
    out = {}
    for pid in cluster.job_pids():
        try:
            env = dict(x.split(b"=", 1) for x in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in x)
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        jid = env.get(b"SLURM_ARRAY_JOB_ID", env.get(b"SLURM_JOB_ID", b"")).decode()
        if b"submitit.core._submit" in cmd and job.split("_")[0] == jid and b"SLURM_STEP_ID" in env:
            out[env[b"SLURMD_NODENAME"].decode()] = pid
    return out


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.prometheus
def test_two_node_run_under_faults(slurm_cluster, prometheus_server, digits8_dir, tmp_path):
    grid = _two_node_grid(tmp_path)
    runs, log_dir = tmp_path / "runs", tmp_path / "runs" / "_slurm"
    run_dir = runs / RUN2
    common = ["--partition", "gpu", "--grid", grid, "--var", f"data_root={digits8_dir}", "--run-root", runs]
    port = free_port()
    steps = ["train.steps=80", "checkpoint.every=4", "log.every=1", f"log.metrics_port={port}"]
    env = {"DITSCALE_TEST_STEP_DELAY": "0.5", "DITSCALE_METRICS_HOST": "127.0.0.1"}
    prometheus_server.set_targets({}, file_sd={"ditscale-slurm": [str(log_dir / "targets" / "*.json")]})

    r = launcher(*common, *steps, env=env)
    assert r.returncode == 0, r.stderr
    job = records.jobs(log_dir)[RUN2]["job_id"]
    claim = C.current([str(run_dir)])[str(run_dir)]  # the run's claim names its job, beside the run dir
    assert claim.data["job"] == job and claim.data["backend"] == "slurm" and claim.data["log_dir"] == str(log_dir)

    # service discovery: Prometheus knows only the file_sd files the ranks write; it scrapes both ranks
    loss = prometheus_server.wait_for(
        f'ditscale_train_loss{{ditscale_run="{RUN2}"}}',
        lambda res: {s["metric"].get("ditscale_rank") for s in res} == {"0", "1"}, timeout=300,
    )  # fmt: skip
    assert {s["metric"]["rank"] for s in loss} == {"0", "1"} and all(float(s["value"][1]) > 0 for s in loss)

    # the same grid again, another log dir, while it trains: nothing is submitted
    r = launcher(*common, *steps, "--log-dir", tmp_path / "other-log-dir", env=env)
    assert r.returncode == 0, r.stderr
    assert f"skip {RUN2}: held by a live trainer" in r.stdout and "nothing to submit" in r.stdout
    assert _queue(slurm_cluster).split() == [job]

    # a rank that stops making progress shows as stalled, with the age of its last step
    procs = wait_for("both ranks", lambda: (p := _run_procs(slurm_cluster, job)).keys() == {"n1", "n2"} and p, 60)
    os.kill(procs["n2"], signal.SIGSTOP)
    try:
        st = wait_for("a stalled status", lambda: (s := launcher(*common, *steps, "--status", "--stall-after", "3"))
                      .stdout.count("stalled") and s, 120)  # fmt: skip
    finally:
        os.kill(procs["n2"], signal.SIGCONT)
    line = next(x for x in st.stdout.splitlines() if x.startswith(RUN2))
    assert " stalled " in line and f"RUNNING job {job}; last step " in line and " ago" in line

    # node n2 dies: the rank on n1 sees its peer go, requeues the job at once; n2 comes back, the job resumes
    wait_for("a checkpoint", lambda: (run_dir / "checkpoints" / "latest").exists(), 120, slurm_cluster)
    t = {"killed": time.monotonic()}
    assert slurm_cluster.kill_node("n2"), "no process of the job ran on n2"
    rec = wait_for("the requeue", lambda: T.failure_records(log_dir, job), 120, slurm_cluster)
    t["requeued"] = time.monotonic()
    assert rec[0]["action"] == "requeued" and rec[0]["reason"].startswith("rank 0: ")
    step_at_failure = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    slurm_cluster.start_node("n2")
    t["node back"] = time.monotonic()
    wait_for("the requeued job pending", lambda: slurm_cluster.run("squeue", "-h", "-j", job, "-o", "%T").stdout
             .strip() == "PENDING", 300, slurm_cluster)  # fmt: skip
    t["pending"] = time.monotonic()
    slurm_cluster.start_now(job)  # skip Slurm's 2-minute requeue hold
    err_file = log_dir / job / f"{job}_0_log.err"
    resumed = wait_for("the resumed trainer", lambda: re.search(r"resumed at step (\d+)", err_file.read_text()),
                       300, slurm_cluster)  # fmt: skip
    t["resumed"], wall = time.monotonic(), time.time()

    def new_step():
        try:
            last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        except (ValueError, IndexError):  # a line being written
            return False
        return last["step"] > int(resumed.group(1)) and last["time"] >= wall - 1

    wait_for("a step after the resume", new_step, 120, slurm_cluster)
    t["first step"] = time.monotonic()
    wait_for("the run to finish", lambda: (run_dir / "final.json").exists(), 420, slurm_cluster)
    final = json.loads((run_dir / "final.json").read_text())
    assert final["step"] == 80 and final["world_size"] == 2
    err = err_file.read_text()
    assert "failure 1 of 3 allowed (--max-failures): requeued job" in err
    assert f"{RUN2}: resuming from checkpoint step_" in err
    steps_logged = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 80, "a step logged twice"
    wait_for("finished ranks to remove their file_sd targets", lambda: not list((log_dir / "targets").glob("*.json")),
             180, slurm_cluster)  # fmt: skip
    marks = list(t.items())
    gaps = ", ".join(f"{b} +{t1 - t0:.1f} s" for (_, t0), (b, t1) in zip(marks, marks[1:], strict=False))
    print(f"\n[faults] node n2 killed at step {step_at_failure}; {gaps}")
    wait_for("the queue to drain", lambda: _queue(slurm_cluster) == "", 120, slurm_cluster)
    st = launcher(*common, *steps, "--status")
    assert f"ended job {job}, 1 failure" in st.stdout and "1 runs: 1 done" in st.stdout

    # more steps for the finished run: submitted again, it continues; its time-outs used up, it stays resumable
    more = ["train.steps=1000", *steps[1:]]
    r = launcher(*common, *more, "--time", "3", "--max-timeouts", "0", env=env)
    assert r.returncode == 0 and "submitted job array" in r.stdout, r.stderr
    assert "warning: --time 3 min" in r.stderr
    job2 = records.jobs(log_dir)[RUN2]["job_id"]
    wait_for("the job to end", lambda: job2 not in _queue(slurm_cluster).split(), 400, slurm_cluster)
    err = (log_dir / job2 / f"{job2}_0_log.err").read_text()
    assert f"{RUN2}: resuming from checkpoint step_00000080" in err
    assert "time limit reached and all 0 requeues for time-outs are used up (--max-timeouts): not requeued" in err
    assert "Job completed successfully" not in err and "UncompletedJobError" not in err
    st = launcher(*common, *more, "--status")
    line = next(x for x in st.stdout.splitlines() if x.startswith(RUN2))
    assert " resumable " in line and f"ended job {job2}" in line
    assert int(line.split()[2].split("/")[0]) > 80
