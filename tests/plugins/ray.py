"""Fixture for a real ray service (see tests/conftest.py)."""
