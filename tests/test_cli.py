"""The command line as a user meets it: a wrong option answered with that subcommand's usage, every default in
--help, the eval commands' data options named alike."""

from __future__ import annotations

import re

import pytest

from ditscale.cli import main


@pytest.mark.parametrize(
    "argv, usage",
    [
        (["eval", "psnr-gap", "--run", "x", "--bogus"], "usage: python -m ditscale eval psnr-gap"),
        (["eval", "locality", "--run", "x", "--data-split", "test"], "usage: python -m ditscale eval locality"),
        (["train", "--config", "c.yaml", "--stepz", "3"], "usage: python -m ditscale train"),
        (
            ["data", "build", "digits", "--out", "o", "--resolution", "8", "--resolutoin", "8"],
            "usage: python -m ditscale data build",
        ),
    ],
)
def test_a_wrong_option_prints_the_subcommands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and "unrecognized arguments" in err


@pytest.mark.parametrize("metric", ["psnr-gap", "pair", "locality", "fid", "jacobian", "classifier"])
def test_help_shows_every_default(metric, capsys):
    with pytest.raises(SystemExit):
        main(["eval", metric, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    import sys

    from ditscale.cli import build_parser

    sys.argv[1:2] = ["eval"]  # build_parser imports only the named command's options
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["eval"]
    sub = next(a for a in sub._actions if a.dest == "metric").choices[metric]
    for action in sub._actions:
        if (
            action.option_strings
            and action.default not in (None, False, "==SUPPRESS==")
            and action.help != "==SUPPRESS=="
        ):
            assert re.search(r"\(default: [^)]", text), action.option_strings
            shown = str(action.default) in text or "(default: the" in text
            assert shown, f"{action.option_strings} default {action.default!r} not in --help"
    if metric in ("psnr-gap", "locality", "jacobian"):  # the same names for the same thing
        assert "--train TRAIN" in text and "--test TEST" in text
    if metric != "classifier":
        assert "--tag TAG" in text and "newest complete checkpoint" in text
    if metric == "psnr-gap":
        for flag in (
            "--k K images per split (K): the first K of each, in index order (default: 300)",
            "(default: 50)",
            "--seed SEED seed of the noise (and sample) draws (default: 0)",
            "--batch-size BATCH_SIZE images per forward pass (default: 256)",
        ):
            assert flag in text
