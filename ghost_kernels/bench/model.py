"""Model-level benchmark: GhostNet 1.0x (timm ``ghostnet_100`` architecture, random weights), images/s under AMP."""
from __future__ import annotations

import copy
import time
from typing import Dict, List

import torch

from ..convert import convert
from .harness import Skip, randomize_, rel_err, time_fn


def bench_model(device: torch.device, batch: int, dtype: torch.dtype, layout: torch.memory_format,
                fused_backends: List[str], compile_budget: Dict[str, float], image_size: int = 224,
                progress=print, train: bool = False) -> List[dict]:
    """Inference images/s under AMP (fp32 model, ``torch.autocast`` to ``dtype``; plain fp32 when
    ``dtype`` is float32): timm eager, timm + torch.compile, convert() for each fused backend, and
    convert + torch.compile. Each output is checked against a float32 run first."""
    try:
        import timm
    except ImportError:
        return [dict(op="infer", impl="timm_eager", status="skipped", note="timm is not installed")]
    base = randomize_(timm.create_model("ghostnet_100", pretrained=False)).train(train)
    model = base.to(device=device, memory_format=layout)
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x[:8]).double() if not train else None
    amp = dtype in (torch.float16, torch.bfloat16)

    def under_amp(fn):
        def run(inp):
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                return fn(inp)
        return run

    candidates = {"timm_eager": lambda: model, "timm_compile": lambda: _compiled(model, compile_budget)}
    for b in fused_backends:
        if train and b == "cuda":
            continue  # inference-only backend
        candidates[f"convert_{b}"] = lambda b=b: convert(copy.deepcopy(model), backend=b)
        candidates[f"convert_{b}_compile"] = lambda b=b: _compiled(convert(copy.deepcopy(model), backend=b),
                                                                   compile_budget)
    rows = []
    if train:
        return _bench_train(device, batch, dtype, layout, candidates, compile_budget, x, amp, progress)
    for impl, make in candidates.items():
        progress(f"model: {impl}")
        row = dict(op="infer", impl=impl, batch=batch, dtype=str(dtype).replace("torch.", ""),
                   precision="amp" if amp else "fp32",
                   layout="channels_last" if layout == torch.channels_last else "nchw", image_size=image_size)
        rows.append(row)
        try:
            t0 = time.perf_counter()
            fn = under_amp(make())
            with torch.no_grad():
                out = fn(x)  # compiles, for the compile rows
            row["setup_s"] = round(time.perf_counter() - t0, 1)
            if impl.endswith("compile"):
                compile_budget["model_compile"] -= row["setup_s"]
            row["rel_err"] = rel_err(out[:8], ref)
            if not row["rel_err"] < 0.1:
                row.update(status="wrong", note=f"logits rel err {row['rel_err']:.2e} vs float32")
                continue
            with torch.no_grad():
                med, p20, p80 = time_fn(lambda: fn(x), device, rep_ms=300)
            row.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, images_per_s=batch / (med * 1e-3))
        except Skip as exc:
            row.update(status="skipped", note=str(exc))
        except Exception as exc:
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
    return rows


def _bench_train(device, batch, dtype, layout, candidates, compile_budget, x, amp, progress) -> List[dict]:
    """Training images/s: forward (train-mode BN) + backward + SGD step under AMP with GradScaler,
    and the peak memory of one step. The first step's loss is checked against timm eager's."""
    y = torch.randint(0, 1000, (x.shape[0],), device=device)
    rows, ref_loss = [], None
    for impl, make in candidates.items():
        progress(f"model train: {impl}")
        row = dict(op="train", impl=impl, batch=batch, dtype=str(dtype).replace("torch.", ""),
                   precision="amp" if amp else "fp32",
                   layout="channels_last" if layout == torch.channels_last else "nchw", image_size=x.shape[-1])
        rows.append(row)
        try:
            t0 = time.perf_counter()
            model = make()
            opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
            scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)

            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                return loss

            state = copy.deepcopy(model.state_dict())
            loss = step().item()  # compiles, for the compile rows
            model.load_state_dict(state)  # the checked step must not drift the timed model away
            row["setup_s"] = round(time.perf_counter() - t0, 1)
            if impl.endswith("compile"):
                compile_budget["model_compile"] -= row["setup_s"]
            ref_loss = loss if ref_loss is None else ref_loss
            row["loss"] = loss
            if not abs(loss - ref_loss) <= 0.05 * abs(ref_loss):
                row.update(status="wrong", note=f"first-step loss {loss:.4f} vs timm eager {ref_loss:.4f}")
                continue
            med, p20, p80 = time_fn(step, device, rep_ms=300)
            row.update(status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, images_per_s=x.shape[0] / (med * 1e-3))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                step()
                torch.cuda.synchronize(device)
                row["peak_MiB"] = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
        except Skip as exc:
            row.update(status="skipped", note=str(exc))
        except Exception as exc:
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
    return rows


def _compiled(model, compile_budget):
    if next(model.parameters()).device.type != "cuda":
        raise Skip("torch.compile is timed on CUDA only")
    if compile_budget.get("model_compile", 0) <= 0:
        raise Skip("compile: time cap reached (--model-compile-budget)")
    import torch._dynamo

    torch._dynamo.reset()
    return torch.compile(model)
