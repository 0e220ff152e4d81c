"""What a test needs and may not find: skip on a developer's machine, fail under CI=true (CI installs everything,
so a skip there would hide a broken install)."""

from __future__ import annotations

import importlib
import os

import pytest


def skip_or_fail(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing service or package is a failure)", pytrace=False)
    pytest.skip(reason)


def import_or_fail(module: str, extra: str):
    """The module, or a skip (a failure under CI=true) naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        skip_or_fail(f"{module} is not installed (pip install 'ditscale[{extra}]'): {e}")
