"""ditscale: DiTs with local-attention windows at cluster scale."""

__version__ = "0.1.0"
