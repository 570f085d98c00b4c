"""Test setup. On a machine without a GPU the Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before ghost_kernels (which defines the kernels) is imported, so it is
set here, at conftest import time, when no CUDA device is visible. On a GPU the same tests run on
device="cuda" (see helpers.DEVICE).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The oracle must be accurate: eager fp32 convs on a GPU default to TF32 (~1e-3 relative error).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
