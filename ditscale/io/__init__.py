"""Where a run's bytes live: `storage` (every URL read and write: retries, atomic writes, named errors), `rundir`
(a run's layout and state: config and its history, checkpoints, done, the lock) and `lock` (one writer per run)."""
