"""Data shipped with hashrec."""

from __future__ import annotations

from pathlib import Path

__all__ = ["kuairand_sample_dir"]


def kuairand_sample_dir() -> str:
    """Folder of the KuaiRand-Pure sample (official layout, gzipped; CC BY-SA 4.0)."""
    return str(Path(__file__).parent / "kuairand_sample")
