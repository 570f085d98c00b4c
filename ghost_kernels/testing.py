"""Numerical comparison shared by the tests and the benchmarks (one rule for both)."""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 over the elements where ``ref`` is not NaN; NaN in ``out`` where
    ``ref`` has none (or the reverse) gives inf, as does an Inf in ``out`` against a finite ``ref``."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if out64.shape != ref64.shape:
        raise ValueError(f"rel_err: shapes differ, {tuple(out64.shape)} vs {tuple(ref64.shape)}")
    if torch.isnan(out64).ne(torch.isnan(ref64)).any():
        return float("inf")
    finite = ~torch.isnan(ref64)
    diff = (out64 - ref64)[finite]
    same_inf = torch.isinf(ref64[finite]) & (out64[finite] == ref64[finite])
    diff = torch.where(same_inf, torch.zeros_like(diff), diff)
    ref_f = torch.where(torch.isinf(ref64[finite]), torch.zeros_like(diff), ref64[finite])
    return (diff.norm() / ref_f.norm().clamp_min(1e-300)).item()
