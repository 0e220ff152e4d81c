"""Fixture for a real slurm service (see tests/conftest.py)."""
