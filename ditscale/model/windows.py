"""Window specs: the one parser that turns what users write ("local@head", "5x6", "3,5,7,-,...") into one entry per
DiT block: `None` for global attention or an odd `k` for a border-clipped k x k window.

Grammar (whitespace ignored, case-insensitive):

    spec      := "global" | "none" | ""                     every block global
               | body [ "@" placement ]
    body      := "local" | "local*" | items
    items     := item { "," item } [ "," "..." ]
    item      := K | K "x" N | "-" | "-x" N                  K odd >= 1, N >= 1; "-" (or "g") = a global block
    placement := "head" | "mix" | "tail"

Presets (An et al. 2024): `local` = 3,5,7,9,11,13 and `local*` = 3,3,3,5,5,5,7,7,7.

Without a placement the items are read block by block from block 0; blocks after the last item are global
(a trailing "..." may be written to say so). With a placement the items are the windowed blocks, in order (no "-"),
and m = len(items) of them are placed in a model of depth D as:

* `head`: blocks 0 .. m-1;
* `tail`: blocks D-m .. D-1;
* `mix`:  blocks floor(i * (D-1) / (m-1) + 1/2) for i = 0 .. m-1 (m >= 2): spread evenly from the first block to
  the last, rounding halves up; with m = 1 the single window goes to block 0.
  E.g. `local@mix` at depth 12 -> blocks 0, 2, 4, 7, 9, 11.

A bad spec (even or non-positive k, more blocks than the depth, an unknown preset or placement) raises
WindowSpecError quoting the spec.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ditscale.errors import WindowSpecError

PRESETS: dict[str, list[int]] = {
    "local": [3, 5, 7, 9, 11, 13],
    "local*": [3, 3, 3, 5, 5, 5, 7, 7, 7],
}
_GLOBAL_WORDS = {"-", "g", "global", "none"}
_ITEM = re.compile(r"^(?P<k>-|g|global|none|\d+)(?:x(?P<n>\d+))?$")


def _mix(m: int, depth: int) -> list[int]:
    if m <= 1:
        return list(range(m))
    # exact rational rounding, halves up: floor((2*i*(D-1) + (m-1)) / (2*(m-1)))
    return [(2 * i * (depth - 1) + (m - 1)) // (2 * (m - 1)) for i in range(m)]


# Each placement: (m windowed blocks, depth) -> their block indices. A new placement is one entry here: the parser,
# the grid check, format_windows and the report's placement comparison all read this table.
PLACEMENTS: dict[str, Callable[[int, int], list[int]]] = {
    "head": lambda m, depth: list(range(m)),
    "mix": _mix,
    "tail": lambda m, depth: list(range(depth - m, depth)),
}


def placement_indices(m: int, depth: int, placement: str) -> list[int]:
    """Block indices of m windowed blocks in a model of `depth` blocks for a placement (head, mix or tail)."""
    if not 0 <= m <= depth:
        raise ValueError(f"cannot place {m} windowed blocks in depth {depth}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}")
    return PLACEMENTS[placement](m, depth)


def _check_k(k: object, spec: object) -> int | None:
    if k is None:
        return None
    if isinstance(k, str):
        if k.strip().lower() in _GLOBAL_WORDS:
            return None
        try:
            k = int(k.strip())
        except ValueError:
            raise WindowSpecError(f"window spec {spec!r}: entry {k!r} is neither an odd window size nor '-'") from None
    if isinstance(k, bool) or not isinstance(k, int):
        raise WindowSpecError(f"window spec {spec!r}: entry {k!r} is neither an odd window size nor None")
    if k < 1 or k % 2 == 0:
        raise WindowSpecError(f"window spec {spec!r}: window size {k} must be an odd integer >= 1 (a k x k window)")
    return k


def _parse_items(body: str, spec: str) -> list[int | None]:
    out: list[int | None] = []
    parts = body.split(",")
    if parts and parts[-1] == "...":
        parts = parts[:-1]
    if not parts:
        raise WindowSpecError(f"window spec {spec!r}: no window sizes given")
    for part in parts:
        m = _ITEM.match(part)
        if not m:
            raise WindowSpecError(
                f"window spec {spec!r}: cannot read {part!r}; expected an odd k, 'KxN' (k repeated N times), "
                f"'-' (global block), a preset ({', '.join(PRESETS)}) or 'global'"
            )
        k = _check_k(m.group("k"), spec)
        n = int(m.group("n")) if m.group("n") is not None else 1
        if n < 1:
            raise WindowSpecError(f"window spec {spec!r}: repeat count in {part!r} must be >= 1")
        out.extend([k] * n)
    return out


def _split(spec: str) -> tuple[str, str | None]:
    """The body and the placement of a spec string, as the parser reads them (no whitespace, lower case)."""
    body, at, placement = "".join(spec.split()).lower().partition("@")
    if not at:
        return body, None
    if placement not in PLACEMENTS:
        raise WindowSpecError(
            f"window spec {spec!r}: unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}"
        )
    return body, placement


def _parse_spec(spec: str) -> tuple[list[int | None], str | None] | None:
    """The items and placement of a spec string, before it meets a depth; None for "global"."""
    if "".join(spec.split()).lower() in ("", "global", "none"):
        return None
    body, placement = _split(spec)
    if body in PRESETS:
        windows: list[int | None] = list(PRESETS[body])
    elif body in ("global", "none", ""):
        raise WindowSpecError(f"window spec {spec!r}: nothing to place; write 'global' alone for global attention")
    elif re.fullmatch(r"[a-z_*]+", body):
        raise WindowSpecError(
            f"window spec {spec!r}: unknown preset {body!r}; expected one of {', '.join(PRESETS)} or 'global'"
        )
    else:
        windows = _parse_items(body, spec)
    if placement is not None and any(w is None for w in windows):
        raise WindowSpecError(
            f"window spec {spec!r}: with a placement (@{placement}) list only the windowed blocks, without '-'"
        )
    return windows, placement


def spec_text(value: object) -> object:
    """A window spec as text: what YAML makes of an unquoted spec on the command line or in a file (an int for
    `model.windows=5`, a list for `[3, 5, null]`, None for `null`) becomes the string the parser reads."""
    if value is None:
        return "global"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list | tuple):
        return ",".join("-" if v is None else str(v) for v in value)
    return value


def check_spec(spec: str) -> str:
    """Raise WindowSpecError if `spec` is not a valid spec string (its grammar; the depth is checked when a model
    is built). Returns the spec."""
    if not isinstance(spec, str):
        raise WindowSpecError(f"window spec {spec!r}: expected a spec string such as 'local@head' or '3,5,7'")
    _parse_spec(spec)
    return spec


def placement_of(spec: str) -> tuple[str, str] | None:
    """(body, placement) of a spec written with a placement, as the parser reads it: "Local* @ MIX" ->
    ("local*", "mix"); None for a spec without one. Raises WindowSpecError for a spec the parser refuses."""
    body, placement = _split(check_spec(spec))
    return None if placement is None else (body, placement)


def parse_windows(spec: str | Sequence[int | str | None] | None, depth: int) -> list[int | None]:
    """Resolve a window spec against a model depth: one entry per block, None (global) or an odd k.

    `spec` is a spec string (see the module docstring), None (all global), or an explicit per-block list whose
    length must equal `depth` (entries: odd int, None, or "-").
    """
    if depth < 1:
        raise WindowSpecError(f"window spec {spec!r}: model depth must be >= 1, got {depth}")
    if spec is None:
        return [None] * depth
    if not isinstance(spec, str):
        entries = list(spec)
        if len(entries) != depth:
            raise WindowSpecError(
                f"window list {entries!r} has {len(entries)} entries but the model has depth {depth}; give one entry "
                f"per block (None for global), or a spec string such as {','.join(str(e) for e in entries)!r} "
                f"that fills the remaining blocks with global attention"
            )
        return [_check_k(e, spec) for e in entries]

    parsed = _parse_spec(spec)
    if parsed is None:
        return [None] * depth
    windows, placement = parsed
    if placement is None:
        if len(windows) > depth:
            raise WindowSpecError(
                f"window spec {spec!r} describes {len(windows)} blocks but the model has depth {depth}"
            )
        return windows + [None] * (depth - len(windows))

    if len(windows) > depth:
        raise WindowSpecError(
            f"window spec {spec!r} has {len(windows)} windowed blocks but the model has depth {depth}"
        )
    out: list[int | None] = [None] * depth
    for idx, k in zip(placement_indices(len(windows), depth, placement), windows, strict=True):
        out[idx] = k
    return out


def _runs(windows: Sequence[int | None]) -> str:
    items = []
    i = 0
    while i < len(windows):
        j = i
        while j < len(windows) and windows[j] == windows[i]:
            j += 1
        tok = "-" if windows[i] is None else str(windows[i])
        items.append(tok if j - i == 1 else f"{tok}x{j - i}")
        i = j
    return ",".join(items)


def format_windows(windows: Sequence[int | None]) -> str:
    """A short spec string for a per-block window list; `parse_windows(format_windows(w), len(w)) == w`.

    Uses a preset with its placement when one matches ("local@mix"), then the windowed blocks with @tail or @mix
    when that placement reproduces the list, else run-length items from block 0 ("3x3,5x3,-,7").
    """
    windows = [_check_k(w, list(windows)) for w in windows]
    depth = len(windows)
    if all(w is None for w in windows):
        return "global"
    for name, ks in PRESETS.items():
        if len(ks) <= depth:
            for placement in PLACEMENTS:
                if parse_windows(f"{name}@{placement}", depth) == windows:
                    return f"{name}@{placement}"
    windowed = [w for w in windows if w is not None]
    if windows[: len(windowed)] == windowed:  # head placement: the default
        return _runs(windowed)
    for placement in ("tail", "mix"):
        if parse_windows(f"{_runs(windowed)}@{placement}", depth) == windows:
            return f"{_runs(windowed)}@{placement}"
    last = max(i for i, w in enumerate(windows) if w is not None)
    return _runs(windows[: last + 1])


class GlobalWindowWarning(UserWarning):
    """A window covers the whole token grid from every position: its block computes global attention."""


def covering_windows(windows: Sequence[int | None], grid: tuple[int, int]) -> list[tuple[int, int]]:
    """(block, k) of the windows that cover an h x w grid from every query position: (k - 1) / 2 >= max(h, w) - 1,
    i.e. k >= 2 max(h, w) - 1. Such a block computes exactly global attention."""
    reach = max(grid) - 1
    return [(i, k) for i, k in enumerate(windows) if k is not None and (k - 1) // 2 >= reach]


def check_window_coverage(windows: Sequence[int | None], grid: tuple[int, int], *, strict: bool = False) -> None:
    """Warn (GlobalWindowWarning), or with `strict` raise WindowSpecError, when a window covers the whole token grid
    (see covering_windows): the block is "local" by its spec but computes global attention."""
    cover = covering_windows(windows, grid)
    if not cover:
        return
    h, w = grid
    side = max(h, w)
    blocks = ", ".join(f"block {i} (k={k})" for i, k in cover)
    fix = f"use windows of at most {2 * side - 3}" if side > 1 else "no window is local on a 1 x 1 grid: use 'global'"
    msg = (
        f"window spec {format_windows(windows)!r} on a {h}x{w} token grid: {blocks} "
        f"{'covers' if len(cover) == 1 else 'cover'} the whole grid from every position (k >= {2 * side - 1}), so "
        f"{'this block computes' if len(cover) == 1 else 'these blocks compute'} global attention, not local; {fix} "
        f"or a larger grid (input_size / patch_size)"
    )
    if strict:
        raise WindowSpecError(msg)
    import warnings

    warnings.warn(msg + " (model.strict_windows: true makes this an error)", GlobalWindowWarning, stacklevel=3)
