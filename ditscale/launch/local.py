"""Local executor: a grid on one machine (a workstation, CI), N runs at a time, with the launchers' skip and resume.

Each run is the command a user would type, `python -m ditscale train --config <log dir>/<run id>.yaml` (for a
run of K processes, nodes x tasks per node, `python -m torch.distributed.run --standalone --nproc_per_node K -m
ditscale train ...`), started in its own session with its output in `<log dir>/<run id>.log`. Finished runs
(RunDir.is_done) are skipped, and so are runs a live trainer holds (another launcher); the trainer resumes a run
from its latest checkpoint on its own. The grid's missing data is prepared first (ditscale.launch.prepare).

Ctrl-C or SIGTERM: no new run starts, every running one gets SIGTERM (the trainer checkpoints at the end of its
step and exits; run the command again to resume); a second Ctrl-C kills them.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ditscale import results
from ditscale.grid import RunSpec
from ditscale.io.lock import pid_alive
from ditscale.io.rundir import PENDING, STARTED, RunDir
from ditscale.launch import guard
from ditscale.launch.common import Plan

log = logging.getLogger("ditscale.launch")


@dataclass
class LocalOptions:
    log_dir: Path
    parallel: int = 1  # runs at the same time
    threads: int | None = None  # OMP_NUM_THREADS of each process (default: the run's cpus_per_task)
    poll_s: float = 0.5
    stall_after_s: float = 600.0  # --status: a running run without a new step for this long is "stalled"


def train_command(run: RunSpec, config_file: Path | str) -> list[str]:
    """The command that trains the run (argv; "python" is this interpreter when it is started)."""
    train = ["-m", "ditscale", "train", "--config", str(config_file)]
    n = run.num_tasks
    if n > 1:
        return ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *train]
    return ["python", *train]


def _config_file(run: RunSpec, opts: LocalOptions) -> Path:
    return opts.log_dir / f"{run.id}.yaml"


def _state_file(run_id: str, log_dir: Path) -> Path:
    return log_dir / f"{run_id}.state.json"


def scheduler_view(runs: list[RunSpec], log_dir: Path) -> dict[str, str]:
    """run id -> 'pid 123' while this machine's process for it runs, 'exited 1' after a failure."""
    view = {}
    for r in runs:
        f = _state_file(r.id, log_dir)
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if st.get("rc") is None and pid_alive(int(st.get("pid", 0) or 0)):
            view[r.id] = f"pid {st['pid']}"
        elif st.get("stopped"):
            view[r.id] = "stopped (Ctrl-C/SIGTERM)"
        elif st.get("rc") not in (None, 0):
            view[r.id] = f"exited {st['rc']}"
    return view


def status(plan: Plan, opts: LocalOptions) -> str:
    rows = results.run_states(plan.runs, scheduler_view(plan.runs, opts.log_dir), opts.stall_after_s)
    for row in rows:
        if row["scheduler"].startswith("exited") and row["state"] in (PENDING, STARTED):
            row["state"] = "failed"
            row["checkpoint"] = f"see {opts.log_dir / (row['run'] + '.log')}"
    return results.format_status(rows)


def format_plan(plan: Plan, opts: LocalOptions) -> str:
    from ditscale.launch.prepare import format_data_plan

    held = guard.busy(plan.todo)  # a live trainer (started by another launcher) holds the run dir
    lines = [
        f"{plan.header()}, {len(held)} running elsewhere, {len(plan.todo) - len(held)} to train on this "
        f"machine, {opts.parallel} at a time"
    ]
    if plan.data is not None:
        lines += ["", format_data_plan(plan.data, {s.name: "prepared here first" for s in plan.data.todo}), ""]
    for r in plan.runs:
        what = "done" if r in plan.done else ("running" if r.id in held else "train")
        cmd = shlex.join(train_command(r, _config_file(r, opts)))
        lines.append(f"  {r.id:<40} {what:<8} processes={r.num_tasks}  {r.run_dir}")
        if what == "train":
            lines.append(f"  {'':<40}   {cmd}")
    lines.append(f"\nlogs and run configs: {opts.log_dir}")
    return "\n".join(lines)


@dataclass
class _Proc:
    run: RunSpec
    popen: subprocess.Popen
    log_file: Path
    started: float = field(default_factory=time.time)


class LocalExecutor:
    """Trains a plan's unfinished runs on this machine, `opts.parallel` at a time."""

    def __init__(self, plan: Plan, opts: LocalOptions):
        self.plan, self.opts = plan, opts
        self.procs: dict[str, _Proc] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.interrupts = 0

    # --- signals ----------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self.interrupts += 1
        name = signal.Signals(signum).name
        sig = signal.SIGTERM if self.interrupts == 1 else signal.SIGKILL
        if self.interrupts == 1:
            print(f"\n{name}: stopping; the running runs checkpoint and exit (again to kill them)", flush=True)
        for p in self.procs.values():
            try:
                os.killpg(p.popen.pid, sig)  # the whole session: torchrun and its ranks
            except ProcessLookupError:
                pass

    # --- runs -------------------------------------------------------------------------------------------------
    def _start(self, run: RunSpec) -> None:
        cfg_file = _config_file(run, self.opts)
        cfg_file.write_text(yaml.safe_dump(run.config_dict(), sort_keys=False))
        cmd = train_command(run, cfg_file)
        argv = [sys.executable, *cmd[1:]]
        from ditscale.launch.prepare import command_env

        env = command_env()
        env["OMP_NUM_THREADS"] = str(self.opts.threads or run.resources.get("cpus_per_task") or 1)
        log_file = self.opts.log_dir / f"{run.id}.log"
        tag = RunDir(run.run_dir).latest_tag()
        with open(log_file, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
            out.flush()
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[run.id] = _Proc(run, popen, log_file)
        state = {"pid": popen.pid, "rc": None, "log": str(log_file), "started": time.time()}
        _state_file(run.id, self.opts.log_dir).write_text(json.dumps(state))
        what = f"resuming from {tag}" if tag else "starting"
        print(f"{run.id}: {what} (pid {popen.pid}, log {log_file})", flush=True)

    def _reap(self) -> None:
        for rid, p in list(self.procs.items()):
            rc = p.popen.poll()
            if rc is None:
                continue
            del self.procs[rid]
            done = RunDir(p.run.run_dir).is_done(p.run.config.train.steps)
            f = _state_file(rid, self.opts.log_dir)
            stopped = bool(self.interrupts)  # torchrun exits 1 after forwarding our SIGTERM: not a failure
            f.write_text(
                json.dumps(
                    {"pid": p.popen.pid, "rc": rc, "log": str(p.log_file), "ended": time.time(), "stopped": stopped}
                )
            )
            self.results[rid] = {"finished": done, "rc": rc, "log": str(p.log_file)}
            took = time.time() - p.started
            if done:
                print(f"{rid}: done ({took:.0f} s)", flush=True)
            elif rc == 0 or self.interrupts:
                st = RunDir(p.run.run_dir).status(p.run.config.train.steps)
                print(
                    f"{rid}: stopped at step {st.step} ({st.checkpoint or 'no checkpoint'}); rerun to resume",
                    flush=True,
                )
            else:
                print(f"{rid}: FAILED (exit code {rc}); see {p.log_file}", flush=True)

    def run(self) -> dict[str, dict[str, Any]]:
        """Prepare the data, then train; run id -> {'finished', 'rc', 'log'} for every run started."""
        from ditscale.launch.prepare import prepare_locally

        self.opts.log_dir.mkdir(parents=True, exist_ok=True)
        for r in self.plan.done:
            log.info("skip %s: finished", r.id)
        held = guard.busy(self.plan.todo)  # never started twice
        for rid, why in held.items():
            print(f"{rid}: skipped, {why}", flush=True)
        queue = [r for r in self.plan.todo if r.id not in held]
        if not queue:
            print(f"grid {self.plan.name!r}: nothing to train ({len(self.plan.done)} finished, {len(held)} running)")
            return {}
        if self.plan.data is not None:
            prepare_locally(self.plan.data, parallel=self.opts.parallel, log_dir=self.opts.log_dir)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while queue or self.procs:
                while queue and len(self.procs) < max(1, self.opts.parallel) and not self.interrupts:
                    self._start(queue.pop(0))
                if self.interrupts and not self.procs:
                    break
                time.sleep(self.opts.poll_s)
                self._reap()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        return self.results


def run_grid(plan: Plan, opts: LocalOptions, *, dry_run: bool = False) -> dict[str, dict[str, Any]]:
    if dry_run:
        print(format_plan(plan, opts))
        print("\ndry run: nothing started")
        return {}
    return LocalExecutor(plan, opts).run()
