"""Status rows, written once for every backend: the run dir's state, what the backend says about the run's job,
stalls, failure reasons, and a summary for large grids.

A row's state is the run dir's (done, diverged, running, resumable, started, pending: ditscale.io.rundir), or
`stalled` (a live job or trainer that logged no step for --stall-after: RunStatus.stall), or `failed` (the job
ended without a checkpoint and said why). WHY holds the last error line of a failed, given-up or diverged run: the
config error, the exit code and signal, the data job and its error, the step at which it diverged. STEP and LOSS
come from the last logged step while a run trains (final.json only once it is done), and the steps a run is judged
against are those it was launched with (its claim), not the grid file's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ditscale.grid import RunSpec
from ditscale.io.rundir import (
    DIVERGED,
    DONE,
    PENDING,
    RESUMABLE,
    RUNNING,
    STARTED,
    RowReader,
    format_starts,
    is_lock_name,
)
from ditscale.launch import claim as C

ATTENTION = ("failed", "stalled", "diverged", "gave up")
FULL_TABLE_MAX = 40  # larger grids: counts per state, then the runs that need attention


@dataclass
class View:
    """What a backend knows about a run's job."""

    text: str = ""  # "RUNNING job 12_0", "pid 1234", "ended job 12_0, 2 failures (gave up)"
    live: bool = False  # queued or running
    running: bool = False  # running now: stall rules apply
    started: float | None = None  # when the job (life) started
    why: str | None = None  # the last error line of its failure
    failed: bool = False  # ended for good without finishing


def read(runs: list[RunSpec], steps: dict[str, int] | None = None, full: bool = False, workers: int = 16):
    """(run id -> RunStatus, run id -> newest claim, the reader) of a grid's runs, with only the reads the rows need.

    One listing per folder of run dirs (object storage) or a few stats per run (disk); then final.json of finished
    runs, the lease of held ones and the claims in flight. A run is judged against the steps it was launched with:
    `steps` (from the log dir's launch records), else its claim (read when the run dir changed after final.json:
    a finished run launched again), else the grid's. Ended claims and the last logged steps are read later, for
    the rows that are shown and the runs whose state depends on them (`details`)."""
    reader = RowReader([r.run_dir for r in runs], workers=workers)
    reader.prefetch()
    gens = {}
    for r in runs:
        names = [n for n, _ in reader.siblings(r.run_dir)]
        gens[r.id] = C.parse_listing(names).get(r.run_dir.rsplit("/", 1)[-1], (0, False))

    def one(r: RunSpec):
        files = reader.files(r.run_dir)
        gen, ended = gens[r.id]
        final_t = (files.get("final.json") or {}).get("mtime")
        again = final_t is not None and (  # a lease beat or a config written after final.json: launched again
            any(is_lock_name(n) and (m.get("mtime") or 0) > final_t for n, m in files.items())
            or (files.get("config.yaml") or {}).get("mtime", 0) > final_t
        )
        cl = None
        if gen and (not ended or again or (steps or {}).get(r.id) is None and final_t is None and full):
            cl = C.read(r.run_dir, gen, ended)
        elif gen:
            cl = C.Claim(r.run_dir, gen, {}, True)  # ended: its record is read only for the rows shown
        n = (steps or {}).get(r.id) or int((cl.data if cl else {}).get("steps") or r.config.train.steps)
        return reader.status(r.run_dir, n, details=full), cl

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(runs) or 1))) as pool:
        got = list(pool.map(one, runs))
    statuses = {r.id: g[0] for r, g in zip(runs, got, strict=True)}
    claims = {r.id: g[1] for r, g in zip(runs, got, strict=True)}
    return statuses, claims, reader


def details(reader: RowReader, runs: list[RunSpec], statuses: dict, claims: dict, ids: list[str], workers: int = 16):
    """Read what the shown rows need: the last logged steps and world sizes, and the records of ended claims."""
    from concurrent.futures import ThreadPoolExecutor

    by_id = {r.id: r for r in runs}

    def one(rid: str) -> None:
        r = by_id[rid]
        reader.add_details(r.run_dir, statuses[rid])
        cl = claims.get(rid)
        if cl is not None and cl.ended_file and not cl.data:
            got = C.read(r.run_dir, cl.gen, True)
            if got is not None:
                cl.data = got.data

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(ids) or 1))) as pool:
        list(pool.map(one, ids))


def to_detail(runs: list[RunSpec], statuses: dict, claims: dict, full: bool) -> list[str]:
    """The runs whose rows are shown or whose state depends on more than the listing: every run of a small grid,
    else the ones that may need attention (started, resumable, diverged, or an ended claim on a run that never got
    a checkpoint: failed?), at most FULL_TABLE_MAX of them. Running runs already have their details."""
    if full or len(runs) <= FULL_TABLE_MAX:
        return [r.id for r in runs]
    maybe = []
    for r in runs:
        st, cl = statuses[r.id], claims.get(r.id)
        if st.state in (DONE, RUNNING):
            continue
        if st.state in (PENDING, STARTED) and not (cl is not None and cl.ended):
            continue
        maybe.append(r.id)
    failing = [rid for rid in maybe if statuses[rid].state in (PENDING, STARTED)]  # failed? decided by the record
    return failing + [rid for rid in maybe if rid not in failing][:FULL_TABLE_MAX]


def make_rows(
    runs: list[RunSpec],
    statuses: dict[str, Any],
    views: dict[str, View] | None = None,
    stall_after_s: float | None = 600.0,
    data_why: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per run. `data_why`: run id -> why its data step failed (shown on the runs that need it)."""
    rows = []
    for r in runs:
        st, v = statuses[r.id], (views or {}).get(r.id) or View()
        state, why, sched = st.state, v.why, v.text
        if state == DIVERGED:
            f = st.final or {}
            why = f"diverged at step {f.get('step')}: {f.get('error') or 'non-finite loss'}"
        elif state != DONE:
            if (state == RUNNING or v.running) and stall_after_s is not None:
                stalled = st.stall(stall_after_s, r.config.log.every, started=v.started if v.running else None)
                if stalled:
                    state, sched = "stalled", "; ".join(x for x in (sched, stalled) if x)
            if state in (PENDING, STARTED) and v.failed and not v.live:
                state = "failed"
            if not v.live and (data_why or {}).get(r.id) and state in (PENDING, STARTED, "failed"):
                state, why = "failed", data_why[r.id]
        last = st.last or {}
        loss = (st.final or {}).get("loss") if state == DONE else last.get("loss")
        starts = st.extra.get("starts") or []
        rows.append(
            {
                "run": r.id,
                "state": state,
                "step": st.step,
                "steps": st.steps if st.steps is not None else r.config.train.steps,
                "checkpoint": st.checkpoint,
                "scheduler": sched,
                "loss": loss,
                "world": format_starts(starts) if starts else "",
                "why": why or "",
                "run_dir": r.run_dir,
                "holder": st.holder.describe() if st.holder else "",
                "last_step_age": st.last_step_age,
            }
        )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("RUN", "STATE", "STEP", "SCHEDULER", "LOSS", "CHECKPOINT", "WORLD", "WHY")
    lines = [header]
    for row in rows:
        step = "-" if row["step"] is None else f"{row['step']}/{row['steps']}"
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        lines.append(
            (row["run"], row["state"], step, row["scheduler"] or "-", loss, row["checkpoint"] or "-",
             row.get("world") or "-", row.get("why") or "")
        )  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def counts(rows: list[dict[str, Any]]) -> str:
    n: dict[str, int] = {}
    for row in rows:
        n[row["state"]] = n.get(row["state"], 0) + 1
    return f"{len(rows)} runs: " + ", ".join(f"{k} {s}" for s, k in sorted(n.items()))


def needs_attention(row: dict[str, Any]) -> bool:
    return row["state"] in ATTENTION or bool(row.get("why")) or (row["state"] == RESUMABLE and not row["scheduler"])


def format_rows(rows: list[dict[str, Any]], full: bool = False) -> str:
    """The table (every row for a small grid or with `full`), then the counts per state. A large grid: the counts,
    then only the runs that need attention (failed, stalled, diverged, given up, resumable without a job)."""
    if full or len(rows) <= FULL_TABLE_MAX:
        return f"{_table(rows)}\n\n{counts(rows)}"
    attention = [r for r in rows if needs_attention(r)]
    text = counts(rows)
    if attention:
        shown = attention[:FULL_TABLE_MAX]
        text += f"\n\n{len(attention)} need attention" + (
            f" (first {len(shown)})" if len(shown) < len(attention) else ""
        )
        text += ":\n" + _table(shown)
    return text + f"\n\n(--all shows all {len(rows)} rows)"
