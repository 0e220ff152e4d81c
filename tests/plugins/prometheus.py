"""Fixture for a real prometheus service (see tests/conftest.py)."""
