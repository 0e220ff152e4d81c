"""Local executor: a grid on one machine (a workstation, CI), N runs at a time, with the launchers' skip and resume.

LocalBackend (ditscale.launch.backend): each run is the command a user would type, `python -m ditscale train
--config <log dir>/<run id>.yaml` (for a run of K processes, nodes x tasks per node,
`python -m torch.distributed.run --standalone --nproc_per_node K -m ditscale train ...`), started in its own session
with its output in `<log dir>/<run id>.log`. Finished runs are skipped, and so are runs that another launcher
claimed (any backend: a queued Slurm job, a Ray driver, another machine) or a live trainer holds; the trainer
resumes a run from its latest checkpoint on its own. The grid's missing data is prepared first
(ditscale.launch.prepare).

No orphans: every process is started with PR_SET_PDEATHSIG, so when the launcher dies (even kill -9) torchrun or
the trainer gets SIGTERM, and torchrun passes it to its ranks: each checkpoints at the end of its step and exits.
"""

from __future__ import annotations

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

from ditscale.grid import RunSpec
from ditscale.io.rundir import RunDir
from ditscale.launch import claim as C
from ditscale.launch import records
from ditscale.launch.backend import Backend, Capabilities, status
from ditscale.launch.common import Plan, results_dir
from ditscale.launch.prepare import command_env, prepare_locally
from ditscale.launch.rows import View

log = logging.getLogger("ditscale.launch")


@dataclass
class LocalOptions:
    log_dir: Path
    parallel: int = 1  # runs at the same time
    threads: int | None = None  # OMP_NUM_THREADS of each process (default: the run's cpus_per_task)
    nproc: int | None = None  # processes per run (default: the grid's tasks); may change between launches
    poll_s: float = 0.5
    stall_after_s: float = 600.0  # --status: a running run without a new step for this long is "stalled"


def train_command(run: RunSpec, config_file: Path | str, nproc: int | None = None) -> list[str]:
    """The command that trains the run (argv; "python" is this interpreter when it is started) on `nproc`
    processes (default: the grid's tasks). A run resumes on any number of processes (docs/training.md)."""
    train = ["-m", "ditscale", "train", "--config", str(config_file)]
    n = nproc or run.num_tasks
    if n > 1:
        return ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *train]
    return ["python", *train]


def _config_file(run: RunSpec, opts: LocalOptions) -> Path:
    return opts.log_dir / f"{run.id}.yaml"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


@dataclass
class _Proc:
    run: RunSpec
    popen: subprocess.Popen
    log_file: Path
    started: float = field(default_factory=time.time)


class LocalExecutor:
    """Trains the claimed runs on this machine, `opts.parallel` at a time; each run's claim ends with its process."""

    def __init__(self, plan: Plan, opts: LocalOptions, todo: list[RunSpec], claims: dict[str, C.Claim]):
        self.plan, self.opts, self.todo, self.claims = plan, opts, todo, claims
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
        cmd = train_command(run, cfg_file, self.opts.nproc)
        argv = [sys.executable, *cmd[1:]]

        env = command_env()
        env["OMP_NUM_THREADS"] = str(self.opts.threads or run.resources.get("cpus_per_task") or 1)
        log_file = self.opts.log_dir / f"{run.id}.log"
        tag = RunDir(run.run_dir).latest_tag()
        with open(log_file, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
            out.flush()
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)  # fmt: skip
        self.procs[run.id] = _Proc(run, popen, log_file)
        C.update(self.claims[run.id], job=f"pid {popen.pid}", log=str(log_file), started=time.time())
        what = f"resuming from {tag}" if tag else "starting"
        print(f"{run.id}: {what} (pid {popen.pid}, log {log_file})", flush=True)

    def _reap(self) -> None:
        for rid, p in list(self.procs.items()):
            rc = p.popen.poll()
            if rc is None:
                continue
            del self.procs[rid]
            done = RunDir(p.run.run_dir).is_done(p.run.config.train.steps)
            stopped = bool(self.interrupts)  # torchrun exits 1 after forwarding our SIGTERM: not a failure
            why = None
            if not done and not stopped and rc != 0:
                line = records.last_error_line(p.log_file.read_text(errors="replace")[-200_000:])
                why = records.exit_text(rc) + (f": {line}" if line else "")
                records.write_failure(self.opts.log_dir, f"local-{p.popen.pid}", rid, why, "failed")
            C.end(self.claims[rid], rc=rc, stopped=stopped, why=why, finished=done)
            self.results[rid] = {"finished": done, "rc": rc, "log": str(p.log_file), "error": why}
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
                print(f"{rid}: FAILED ({why}); log {p.log_file}", flush=True)

    def run(self) -> dict[str, dict[str, Any]]:
        """Prepare the data, then train; run id -> {'finished', 'rc', 'log'} for every run started."""

        queue = list(self.todo)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if self.plan.data is not None:
                prepare_locally(self.plan.data, parallel=self.opts.parallel, log_dir=self.opts.log_dir)
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
            for r in queue:  # never started (interrupted, or the data failed): free for the next launcher
                C.end(self.claims[r.id], rc=None, stopped=True, why=None, finished=False)
        return self.results


class LocalBackend(Backend):
    """Run a grid of ditscale trainings on this machine: N runs at a time, each its own `python -m ditscale train`.

    The same grid files, data preparation, claims, skip/resume semantics, --status and --collect as the Slurm, Ray and
    Kubernetes launchers: the grid's missing data is prepared first, finished runs (final.json) are skipped and so are
    runs another launcher claimed, an interrupted run resumes from its latest checkpoint, and re-running the command
    trains only what is missing. Ctrl-C (or SIGTERM) makes every running run checkpoint and exit; a second Ctrl-C kills
    them; if the launcher itself is killed, its runs get SIGTERM (no orphans).

      python launchers/local_grid.py --grid configs/grids/digits-placement.yaml --parallel 2 --dry-run
      python launchers/local_grid.py --grid configs/grids/digits-placement.yaml --parallel 2
      python launchers/local_grid.py --grid configs/grids/digits-placement.yaml --status
      python launchers/local_grid.py --grid configs/grids/digits-placement.yaml --collect
    """

    name = "local"
    caps = Capabilities("train", blocking=True, requeue=False, data_as_jobs=False, node_range=True)
    dry_run_help = "print the plan (data steps, runs, commands); start nothing"
    status_help = "show each run's state (run dirs, claims, this machine's processes)"

    @classmethod
    def add_arguments(cls, p) -> None:
        p.add_argument("-j", "--parallel", type=int, default=1, help="runs trained at the same time (default: 1)")
        p.add_argument("--threads", type=int, help="OMP_NUM_THREADS per process (default: the grid's cpus_per_task)")
        p.add_argument(
            "--nproc",
            type=int,
            help="processes per run (default: the grid's tasks); may differ from the last launch: a run resumes on "
            "any number that divides its global batch",
        )

    @classmethod
    def from_args(cls, args, plan: Plan) -> LocalBackend:
        base = results_dir(plan.runs, plan.name)
        opts = LocalOptions(
            log_dir=Path(args.log_dir or base / "_local").absolute(),
            parallel=args.parallel,
            threads=args.threads,
            nproc=args.nproc,
            stall_after_s=args.stall_after,
        )
        return cls(opts)

    def describe_run(self, run: RunSpec) -> str:
        return f"processes={self.opts.nproc or run.num_tasks}"

    def details(self, plan: Plan, todo: list[RunSpec]) -> list[str]:
        cmds = [shlex.join(train_command(r, _config_file(r, self.opts), self.opts.nproc)) for r in todo[:20]]
        lines = [""] + [f"  {r.id}: {c}" for r, c in zip(todo, cmds, strict=False)]
        return lines + [f"\n{len(todo)} to train on this machine, {self.opts.parallel} at a time; logs and run "
                        f"configs: {self.opts.log_dir}"]  # fmt: skip

    def start(self, plan: Plan, todo: list[RunSpec], claims: dict[str, C.Claim]) -> dict[str, Any]:
        self.opts.log_dir.mkdir(parents=True, exist_ok=True)
        self.executor = LocalExecutor(plan, self.opts, todo, claims)
        return self.executor.run()

    def finish(self, plan: Plan, result: dict) -> int:
        print()
        print(status(self, plan, self.opts.stall_after_s))
        if getattr(self, "executor", None) is not None and self.executor.interrupts:
            return 130
        failed = [rid for rid, m in result.items() if not m.get("finished")]
        if failed:
            print(f"error: {len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0

    def views(self, runs: list[RunSpec], claims: dict[str, C.Claim | None]) -> dict[str, View]:
        out = {}
        for r in runs:
            cl = claims.get(r.id)
            if cl is None or cl.data.get("backend") != "local":
                continue
            d = cl.data
            if d.get("ended"):
                if d.get("stopped"):
                    out[r.id] = View("stopped (Ctrl-C/SIGTERM)")
                elif d.get("rc") not in (None, 0):
                    out[r.id] = View(f"exited {d['rc']}", why=d.get("why"), failed=True)
                continue
            alive = C.process_alive(d)
            if alive is False:
                out[r.id] = View(f"launcher pid {d.get('pid')} gone", why="its launcher died")
            else:
                out[r.id] = View(d.get("job") or "starting", live=True, running=bool(d.get("job")),
                                 started=d.get("started"))  # fmt: skip
        return out

    def claim_alive(self, claim: C.Claim) -> bool | None:
        return C.process_alive(claim.data)
