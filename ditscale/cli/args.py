"""The argument parser of every ditscale command line: `key=value` overrides (and other positionals) may come before
or after the options.

argparse fills a `nargs="*"` positional once, from the first run of positionals: `train --config c.yaml
train.steps=5 --run-dir X model.windows=3x2` stops at `model.windows=3x2` ("unrecognized arguments").
`parse_intermixed_args` collects positionals wherever they are, but refuses a parser with sub-commands; this class
uses it in each parser that has none (the command that is finally chosen), so `python -m ditscale train ...`,
`grid ...` and `bench train ...` all accept overrides anywhere. Option values are taken as given (a path is never
parsed as YAML or a template).
"""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose leaf parsers (no sub-commands) accept positionals between options."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        has_subcommands = any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        if self._intermixing or has_subcommands:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args twice itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False
