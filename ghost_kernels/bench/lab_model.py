"""The lab's model phase: GhostNet 1.0x inference images/s, timm + torch.compile against converted +
torch.compile (bf16 under autocast, channels_last), and the layout-copy kernels in a profile of the
compiled converted model (a channels_last model must not pay copies around the fused ops)."""
from __future__ import annotations

import copy
import time
from collections import Counter
from typing import List

import torch

from ..convert import convert
from .harness import randomize_
from .lab_timing import graph_time

COPY_KERNEL_HINTS = ("copy", "clone", "contiguous", "transpose", "permute")


def _profile_copies(fn, x) -> dict:
    """Kernels of one call whose names say they copy or relayout memory, counted by name."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    names = Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    copies = {n: c for n, c in names.items() if any(h in n.lower() for h in COPY_KERNEL_HINTS)}
    return dict(kernels=sum(names.values()), copy_kernels=sum(copies.values()), copies=copies)


def model_phase(device, batch: int, deadline: float) -> dict:
    try:
        import timm
    except ImportError:
        return {"rows": [dict(impl="timm", status="skipped: timm is not installed")]}
    base = randomize_(timm.create_model("ghostnet_100", pretrained=False)).eval().to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = copy.deepcopy(base)(x[:8]).double()
    rows: List[dict] = []
    for impl in ("timm_compile", "convert_auto_compile", "convert_triton_compile", "timm_eager", "convert_auto"):
        if time.perf_counter() > deadline - 30:
            rows.append(dict(impl=impl, status="skipped: lab budget"))
            continue
        row = dict(impl=impl, batch=batch, dtype="bfloat16", precision="amp", layout="channels_last")
        rows.append(row)
        try:
            model = copy.deepcopy(base)
            if impl.startswith("convert"):
                convert(model, backend=impl.split("_")[1])
            if impl.endswith("compile"):
                torch._dynamo.reset()
                model = torch.compile(model)

            def run(inp, model=model):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(inp)

            t0 = time.perf_counter()
            out = run(x)
            row["setup_s"] = round(time.perf_counter() - t0, 1)
            err = ((out[:8].double() - ref).norm() / ref.norm()).item()
            row["rel_err"] = err
            if not err < 0.1:
                row.update(status="wrong", note=f"logits rel err {err:.2e}")
                continue
            med, p20, p80 = graph_time(run, [x], reps=10)
            row.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, images_per_s=batch / (med * 1e-3))
            if impl.startswith("convert") and impl.endswith("compile"):
                row.update(_profile_copies(run, x))
        except Exception as exc:
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
    ok = {r["impl"]: r["images_per_s"] for r in rows if r.get("images_per_s")}
    ratio = {k: v / ok["timm_compile"] for k, v in ok.items() if "timm_compile" in ok}
    return {"rows": rows, "x_timm_compile": ratio}
