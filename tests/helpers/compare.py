"""Comparison of model outputs shared by the parity tests."""

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Max abs diff within `tolerance`, relative to the output's scale where that is larger than 1."""
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= tolerance * scale
