"""pytest-benchmark entries for the CPU (the PyTorch reference path), to track regressions there.

Not part of the default test run (it times things): ``pytest benchmarks/ --benchmark-only``.
"""
import pytest
import torch

import ghost_kernels as gk
from ghost_kernels.bench.harness import randomize_
from ghost_kernels.core.spec import distinct_ghostnet_100_specs

SHAPES = {s.h: s for s in reversed(distinct_ghostnet_100_specs())}  # one module per resolution


@pytest.mark.parametrize("h", sorted(SHAPES, reverse=True))
def test_reference_forward(benchmark, h):
    shape = SHAPES[h]
    mod = randomize_(gk.GhostModule(shape.spec.inp, shape.spec.oup, backend="torch")).eval()
    x = torch.randn(4, shape.spec.inp, shape.h, shape.w).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = benchmark(mod, x)
    assert out.shape == (4, shape.spec.oup, shape.h, shape.w)
