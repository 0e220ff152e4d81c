"""Run `python -m ditscale ...` so that it stops at a chosen rename into a folder and says so, for a test to kill -9
it exactly there (a real process, a real SIGKILL; only the moment is chosen):

    python -m tests.kill_points before:2 WATCH_DIR -- export --run RUN --out WATCH_DIR/m.pt

`before:N` stops just before the N-th rename whose target lies under WATCH_DIR (os.replace, os.rename, or the
swap of a diffusers folder), `after:N` just after it; the line "KILL POINT ..." is printed, then it sleeps.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    where, watch, sep, *command = argv
    assert sep == "--", "usage: python -m tests.kill_points before:N|after:N WATCH_DIR -- COMMAND ..."
    when, n = where.split(":")
    n, watch = int(n), os.path.abspath(watch)
    count = 0

    def stop(what: str) -> None:
        print(f"KILL POINT {where}: {what}", flush=True)
        time.sleep(3600)

    def wrap(real):
        def renamer(src, dst, *args, **kwargs):
            nonlocal count
            if not os.path.abspath(os.fspath(dst)).startswith(watch):
                return real(src, dst, *args, **kwargs)
            count += 1
            if when == "before" and count == n:
                stop(f"{src} -> {dst}")
            out = real(src, dst, *args, **kwargs)
            if when == "after" and count == n:
                stop(f"{src} -> {dst}")
            return out

        return renamer

    os.replace, os.rename = wrap(os.replace), wrap(os.rename)
    import ditscale.interop.diffusers as interop

    interop._exchange = wrap(interop._exchange)
    from ditscale.cli import main as ditscale_main

    rc = ditscale_main(command)
    print(f"FINISHED rc={rc} after {count} renames", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
