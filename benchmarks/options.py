"""Command-line options the benchmarks share."""

from __future__ import annotations

import argparse

import torch

from hashrec.training.loop import resolve_device


def device(text: str) -> torch.device:
    """An argparse type: ``resolve_device``'s device, its refusal as the option's error."""
    try:
        return resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU): timings of a GPU
    start and end with it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def add_device_option(p: argparse.ArgumentParser, help: str = "cpu (default) or cuda[:N]") -> None:
    """``--device``, parsed to a ``torch.device`` (CUDA only where it is available)."""
    p.add_argument("--device", type=device, default="cpu", help=help)
