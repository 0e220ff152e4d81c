"""`python -m ditscale bench storage --url s3://bucket/prefix [--shards 10000]`: the start-up shard check.

Creates `--shards` tiny objects under the URL (once; skipped when they are there), then times `storage.missing()`
over all of them (what the trainer runs before its first step: a listing per directory, HEADs only for names the
listing lacks), with every shard present and with one deleted. Figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from ditscale.io import storage


def run(args) -> int:
    urls = [storage.join(args.url, f"train-{i:06d}.tar") for i in range(args.shards)]
    storage.makedirs(args.url)
    have = set(storage.listdir(args.url))
    todo = [u for u in urls if storage.basename(u) not in have]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda u: storage.write_bytes(u, b""), todo))
    made = time.perf_counter() - t0

    def timed() -> tuple[float, list[str]]:
        t = time.perf_counter()
        gone = storage.missing(urls)
        return time.perf_counter() - t, gone

    present = [timed() for _ in range(args.repeat)]
    assert all(not g for _, g in present), "objects missing after creation"
    storage.remove(urls[len(urls) // 2])
    one_gone = [timed() for _ in range(args.repeat)]
    assert all(g == [urls[len(urls) // 2]] for _, g in one_gone)
    storage.write_bytes(urls[len(urls) // 2], b"")
    res = {
        "url": args.url,
        "shards": args.shards,
        "created": len(todo),
        "create_s": made,
        "check_s_median": statistics.median(t for t, _ in present),
        "check_s_min": min(t for t, _ in present),
        "check_one_missing_s_median": statistics.median(t for t, _ in one_gone),
    }
    print(f"bench storage: {args.shards} shards under {args.url} (created {len(todo)} in {made:.1f} s)")
    print(f"  all present : {res['check_s_median']:.3f} s median, {res['check_s_min']:.3f} s min")
    print(f"  one missing : {res['check_one_missing_s_median']:.3f} s median (found and named)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
