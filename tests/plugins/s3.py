"""Fixture for a real s3 service (see tests/conftest.py)."""
