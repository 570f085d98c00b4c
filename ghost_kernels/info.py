"""``python -m ghost_kernels.info``: versions, devices, and which backends can run here (and why not)."""
from __future__ import annotations

import argparse
import platform
import sys


def collect() -> dict:
    import torch

    from . import __version__
    from .cuda import backend as cuda_backend
    from .dispatch import available_backends
    from .triton import common as triton_common

    info = {
        "ghost_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": getattr(triton_common.triton, "__version__", None),
        "triton_interpreter": triton_common.interpreting(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_extension_build": cuda_backend.BUILD_INFO or None,
        "devices": [],
        "backends": available_backends(),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                                   f"{p.total_memory / 2**30:.0f} GiB)")
    return info


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m ghost_kernels.info",
           description="Prints the versions of ghost_kernels, Python, torch, CUDA and Triton, the visible CUDA "
                       "devices, and every backend: available, or the reason it cannot run here.").parse_args(argv)
    info = collect()
    for key, value in info.items():
        if key in ("devices", "backends"):
            continue
        print(f"{key:>20}: {value}")
    for dev in info["devices"] or ["(no CUDA device)"]:
        print(f"{'device':>20}: {dev}")
    print("backends:")
    for name, reason in info["backends"].items():
        state = "available" if reason is None else "unavailable: " + reason
        if name.startswith("triton") and reason is None and info["triton_interpreter"]:
            state += " (TRITON_INTERPRET=1: CPU interpreter, for testing)"
        print(f"  {name:<16} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
