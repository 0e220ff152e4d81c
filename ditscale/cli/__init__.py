"""`python -m ditscale COMMAND ...`: one entry point, each command implemented in its own module.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`; they are imported only when used,
so `--help` stays fast and a command never pays for another's imports. Every (sub)command's `--help` shows each
option's default, and a wrong option is answered with the usage of the (sub)command it was given to.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ditscale.cli.args import ArgumentParser
from ditscale.errors import DitscaleError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ditscale.cli.train", "train a DiT (alone, under torchrun, deepspeed or srun)"),
    "export": ("ditscale.cli.export", "a run's weights for use elsewhere: DiT state dict + description, or diffusers"),
    "sample": ("ditscale.cli.sample", "draw a grid of samples from a run's checkpoint"),
    "data": ("ditscale.cli.data", "build shards and study subsets (same as shards/build.py, shards/subset.py)"),
    "eval": ("ditscale.cli.eval", "evaluate runs: psnr-gap, pair, locality, fid, jacobian"),
    "report": ("ditscale.cli.report", "the study's tables and plots for a grid of runs"),
    "grid": ("ditscale.cli.grid", "expand a grid file and show its runs"),
    "checkpoint": ("ditscale.cli.checkpoint", "verify a run's checkpoints; convert an older ditscale's layout"),
    "launch": ("ditscale.cli.launch", "launch a grid: slurm, ray, local or k8s (same as launchers/<backend>_grid.py)"),
    "bench": ("ditscale.cli.bench", "benchmarks: attention, data, train, storage, gpu"),
}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already names its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or _no_default(action):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def _no_default(action: argparse.Action) -> bool:
    """Nothing worth printing: no default, a flag that is off, or a suppressed one (0 is a default: `is`)."""
    return action.default is None or action.default is False or action.default == [] or action.default == "==SUPPRESS=="


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]


def finish_parser(parser: argparse.ArgumentParser) -> None:
    """For the parser and every subcommand below it: show defaults in --help (an option without help text gets
    one that names its default) and remember the parser, so that a wrong option prints the usage of the
    subcommand it was given to (argparse itself answers with the top-level usage)."""
    parser.formatter_class = DefaultsHelpFormatter
    parser.set_defaults(_usage_parser=parser)
    for action in parser._actions:
        if not action.help and action.option_strings and not _no_default(action):
            action.help = "(default: %(default)s)"
    for sub in _subparsers(parser):
        finish_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(  # overrides and other positionals may come before or after the options
        prog="python -m ditscale",
        description="ditscale: Diffusion Transformers with local-attention windows, at cluster scale.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name in sys.argv[1:2]:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
    finish_parser(parser)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but unknown options are reported by the innermost subcommand's parser, with its usage."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "_usage_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher inserts --local_rank=N before the command (`deepspeed --module ditscale train ...`).
    while argv and argv[0].startswith(("--local_rank=", "--local-rank=")):
        os.environ.setdefault("LOCAL_RANK", argv[0].split("=", 1)[1])
        argv = argv[1:]
    sys.argv[1:] = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except DitscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
