"""The capture half of the training model (``train.py`` has the design): the training floor, one
training step's Triton launches recorded and its torch ops counted by bytes, and the HBM bytes each
Triton training kernel moves, declared per kernel."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from . import rows as terms
from .cases import make_inputs
from .errors import OfflineError
from .latency import L2_RESIDENT_BYTES
from .rows import floor_bytes

PHASES = ("forward", "backward")
FAMILY = "triton_train"
# The CI budget of issue 17 for the training kernels (tests/test_offline_train.py)
BYTES_BUDGET = 1.6           # bytes moved / training floor, over the network's modules
KERNEL_INSTR_BUDGET = 0.3    # warp-instructions per byte of a kernel's own traffic
# The kernel files a training row depends on (a committed result records their hashes)
TRAIN_KERNEL_FILES = ("train_kernels.py", "train_ops.py", "train_backward.py", "two_pass.py", "two_pass_train.py",
                      "two_pass_gemm.py", "two_pass_stencil.py", "two_pass_rows.py", "two_pass_nchw.py",
                      "two_pass_config.py", "common.py")
# The pass names of the design note (train_kernels.py), per phase, kernel and its STATS / GRAD constexpr
PASS_NAMES = {("forward", "_pw_kernel", True): "F1", ("forward", "_pw_kernel", False): "F2",
              ("forward", "_dw_kernel", True): "F3", ("forward", "_dw_kernel", False): "F4",
              ("forward", "_dw_nchw_kernel", False): "F4",
              ("backward", "_pw_kernel", False): "B0", ("backward", "_dw_kernel", "grad1"): "B1",
              ("backward", "_dw_kernel", "grad2"): "B2", ("backward", "_dw_kernel", "grad3"): "B2",
              ("backward", "_dw_bwd_kernel", None): "B3", ("backward", "_pw_kernel", "grad1"): "B4",
              ("backward", "_pw_kernel", "grad2"): "B5", ("backward", "_pw_kernel", "grad3"): "B5"}


# --------------------------------------------------------------------------------------------------
# The floor

def param_grad_bytes(spec, elem: int) -> int:
    """Bytes of the parameter gradients a backward writes: dL/dw1, dL/dwd, BN1's and BN2's weight and
    bias (``elem`` bytes each: the module's parameters are in the compute dtype, the bench's
    ``module.to(dtype)``)."""
    k, d = spec.kernel_size, spec.dw_size
    return (spec.m * spec.inp * k * k + spec.new * d * d + 2 * spec.m + 2 * spec.new) * elem


def train_floor(spec, n: int, h: int, w: int, elem: int, phase: str) -> int:
    """The HBM bytes no training step can avoid in ``phase``: forward x read + out written; backward
    dL/dout read + x read + dL/dx written + the parameter gradients written (``train.py``'s docstring)."""
    ho, wo = spec.out_hw(h, w)
    x = n * spec.inp * h * w * elem
    if phase == "forward":
        return floor_bytes(spec, n, h, w, elem)
    if phase == "backward":
        return n * spec.oup * ho * wo * elem + 2 * x + param_grad_bytes(spec, elem)
    raise ValueError(f"phase {phase!r}: expected one of {PHASES}")


# --------------------------------------------------------------------------------------------------
# Capture: Triton launches recorded, torch ops counted

def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def TorchTraffic():
    """A ``TorchDispatchMode`` (built on first use: torch is imported lazily) recording every aten op
    that moves data: ``mode.ops`` = [{"op", "read_bytes", "write_bytes"}]. Views (an op whose result
    aliases an input without writing it) and allocations (``empty*``) move nothing and are not recorded;
    ``copy_``/``fill_``/``zero_`` write their destination without reading it; any other op reads each
    tensor argument once (as viewed) and writes each output and each argument it mutates."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class _Traffic(TorchDispatchMode):
        WRITE_ONLY = ("copy_", "fill_", "zero_")

        def __init__(self):
            super().__init__()
            self.ops: List[dict] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            schema = func._schema
            name = schema.name.split("::")[-1]
            returns_alias = [r.alias_info for r in schema.returns]
            if name.startswith("empty") or name in ("_local_scalar_dense",) or (
                    returns_alias and all(a is not None and not a.is_write for a in returns_alias)):
                return out
            read, largest = 0, 0
            for arg, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in
                                                                   schema.arguments[len(args):]]):
                tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
                if arg.alias_info is not None and arg.alias_info.is_write:   # written: counted as an output
                    write_only = name.rstrip("_") + "_" in self.WRITE_ONLY or arg.name == "out"
                    read += 0 if write_only else sum(_nbytes(t) for t in tensors)
                else:
                    read += sum(_nbytes(t) for t in tensors)
                largest = max([largest] + [_nbytes(t) for t in tensors])
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            written = sum(_nbytes(t) for t in outs)
            largest = max([largest] + [_nbytes(t) for t in outs])
            if read or written:
                self.ops.append(dict(op=f"aten.{name}", read_bytes=read, write_bytes=written, largest=largest))
            return out

    return _Traffic()


def supported_reasons(params) -> List[str]:
    """Why the training ops cannot run this module ([] when they can): ``TRAINING_SUPPORT``'s reasons."""
    try:
        from ...triton.backend import TRAINING_SUPPORT
    except ImportError:   # an older tree
        return []
    return list(TRAINING_SUPPORT.module_reasons(params))


def capture_train(shape, dtype, layout: str, batch: int) -> Dict[str, Tuple[list, list]]:
    """``{phase: (Triton launches, torch ops)}`` of one training step of the module ``shape``: the
    forward (train-mode BN, batch statistics) and its backward, launches recorded and torch ops counted
    (``train.py``'s docstring)."""
    import torch

    from ...core.layout import output_memory_format
    from ...triton import common as tc
    from ...triton.train_backward import train_backward
    from ...triton.train_ops import train_forward

    x, params = make_inputs(shape, dtype, layout, batch)
    reasons = supported_reasons(params)
    if reasons:
        raise OfflineError(f"the training ops do not run this module: {'; '.join(reasons)}")
    w1, bn1, wd, bn2, spec = params[:5]
    values = dict(x=x, w1=w1, wd=wd, b1=getattr(params, "b1", None), b2=getattr(params, "b2", None),
                  bn1_weight=bn1.weight, bn1_bias=bn1.bias, bn2_weight=bn2.weight, bn2_bias=bn2.bias,
                  stats1=None, stats2=None, eps1=float(bn1.eps), eps2=float(bn2.eps), spec=spec, sync_group=None,
                  batch_stats1=True, batch_stats2=True)
    out = {}
    with tc.capture_launches() as rec:
        mode = TorchTraffic()
        with mode:
            fwd = _call(train_forward, values)
    out["forward"] = (list(rec), mode.ops)
    # out, then per BN (mean, 1/std, unbiased variance): train_forward's documented result
    y, values["mean1"], values["invstd1"], _, values["mean2"], values["invstd2"] = fwd[:6]
    values["grad"] = torch.empty_like(y, memory_format=output_memory_format(y))
    with tc.capture_launches() as rec:
        mode = TorchTraffic()
        with mode:
            _call(train_backward, values)
    out["backward"] = (list(rec), mode.ops)
    return out


def _call(fn, values: dict):
    """``fn`` with its parameters taken by name from ``values`` (the training ops' signatures grow: conv
    biases, say); a required parameter the model does not know is an OfflineError naming it."""
    import inspect
    kwargs = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name in values:
            kwargs[p.name] = values[p.name]
        elif p.default is p.empty:
            raise OfflineError(f"{fn.__name__} takes {p.name!r}, which the offline model does not provide "
                               "(bench/offline/train.py: capture_train)")
    return fn(**kwargs)


# --------------------------------------------------------------------------------------------------
# Bytes of the Triton launches (declared per kernel)

def _kernel_name(launch) -> str:
    return getattr(launch.kernel, "__name__", None) or getattr(getattr(launch.kernel, "fn", None), "__name__", "?")


def pass_name(launch, phase: str) -> str:
    """F1-F4, B0-B5 (the design note of ``train_kernels.py``) for a launch of a training ``phase``."""
    name = _kernel_name(launch)
    grad = launch.kwargs.get("GRAD")
    key = f"grad{int(grad)}" if grad else launch.kwargs.get("STATS")
    return PASS_NAMES.get((phase, name, key), name)


def triton_traffic(launch, spec, n: int, h: int, w: int, elem: int) -> dict:
    """``{"read_bytes", "write_bytes", "traffic"}`` of one training launch, from the design note of
    ``triton/train_kernels.py`` (``train.py``'s docstring: conventions). OfflineError for a kernel not declared
    here: a new kernel must say what it moves."""
    name = _kernel_name(launch)
    a = dict(zip(launch.kernel.arg_names, launch.args))
    ho, wo = spec.out_hw(h, w)
    x = n * spec.inp * h * w * elem
    ghost = n * (spec.oup - spec.m) * ho * wo * elem          # out[:, m:] / dL/dout[:, m:]
    weights = _nbytes(a["w1_ptr"]) if "w1_ptr" in a else 0
    weights += _nbytes(a["wd_ptr"]) if "wd_ptr" in a else 0
    y1 = two_pass_y1_bytes(spec, n, ho, wo, elem, launch)
    m_map = n * spec.m * ho * wo * elem                       # y1, dL/dy1, dL/dz1 (m channels)
    grad = int(launch.kwargs.get("GRAD") or 0)
    if name == "_pw_kernel":   # F1, F2; B0 (the backward's y1, as F2 wrote it); B4, B5
        if grad == 1:
            return dict(read_bytes=x + weights + m_map, write_bytes=_nbytes(a["part_ptr"]),
                        traffic="reads x, w1, dL/dy1; writes per-tile BN1 backward sums")
        if grad:
            return dict(read_bytes=x + weights + m_map, write_bytes=m_map,
                        traffic="reads x, w1, dL/dy1; writes dL/dz1 over dL/dy1")
        if launch.kwargs.get("STATS"):
            return dict(read_bytes=x + weights, write_bytes=_nbytes(a["part_ptr"]),
                        traffic="reads x, w1; writes per-tile z1 sums")
        return dict(read_bytes=x + weights, write_bytes=n * spec.m * ho * wo * elem,
                    traffic="reads x, w1; writes y1 into out[:, :m]")
    if name in ("_dw_kernel", "_dw_nchw_kernel"):
        if grad == 1:
            return dict(read_bytes=y1 + ghost + weights, write_bytes=_nbytes(a["part_ptr"]),
                        traffic="reads y1 (B0's), dL/dout[:, m:], wd; writes per-program BN2 backward sums")
        if grad:
            return dict(read_bytes=y1 + ghost + weights, write_bytes=ghost + _nbytes(a["part_ptr"]),
                        traffic="reads y1 (B0's), dL/dout[:, m:], wd; writes g_z2, per-program dL/dbias2")
        if launch.kwargs.get("STATS"):
            return dict(read_bytes=y1 + weights, write_bytes=_nbytes(a["part_ptr"]),
                        traffic="reads y1 (out[:, :m]), wd; writes per-program z2 sums")
        return dict(read_bytes=y1 + weights, write_bytes=ghost,
                    traffic="reads y1 (out[:, :m]), wd; writes out[:, m:]")
    if name == "_dw_bwd_kernel":
        wgrad = _nbytes(a["part_ptr"]) if launch.kwargs.get("WGRAD") else 0
        return dict(read_bytes=ghost + m_map + m_map + weights, write_bytes=m_map + wgrad,
                    traffic="reads g_z2, y1 (B0's), dL/dout[:, :m], wd; writes dL/dy1, per-program dL/dwd")
    raise OfflineError(f"no HBM traffic declared for training kernel {name} (bench/offline/train.py: "
                       "triton_traffic)")


def two_pass_y1_bytes(spec, n: int, ho: int, wo: int, elem: int, launch) -> int:
    """y1 as a stencil pass of ``triton_two_pass`` reads it back: m channels per pixel, in whole 32-byte
    sectors where the output is channels_last (``two_pass.extra_hbm_bytes``)."""
    per_pixel = spec.m * elem
    if launch.kwargs.get("O_MODE") == 2:     # DENSE_CL
        per_pixel = -(-per_pixel // 32) * 32
    return n * ho * wo * per_pixel


def torch_entries(ops: Sequence[dict], phase: str) -> List[dict]:
    """The torch ops of a phase, one entry per aten op name (calls summed), ``kind: "torch"``."""
    by: Dict[str, dict] = {}
    for op in ops:
        e = by.setdefault(op["op"], dict(kind="torch", kernel=op["op"], calls=0, read_bytes=0, write_bytes=0,
                                         small_bytes=0))
        e["calls"] += 1
        e["read_bytes"] += op["read_bytes"]
        e["write_bytes"] += op["write_bytes"]
        if op.get("largest", 0) <= L2_RESIDENT_BYTES:
            e["small_bytes"] += op["read_bytes"] + op["write_bytes"]
    out = []
    for e in by.values():
        e["pass"] = ("B6 GEMMs (cuBLAS)" if e["kernel"] in ("aten.mm", "aten.bmm", "aten.addmm") and
                     phase == "backward" else "torch")
        e["hbm_bytes"] = e["read_bytes"] + e["write_bytes"]
        e["hbm_us"] = terms.hbm_us(e["hbm_bytes"])
        e["predicted_us"] = e["hbm_us"]
        e.update(warp_instr=None, instr_per_byte=None, regs=None, spills=None,
                 note="counted analytically by bytes (inputs read once, outputs written once); instructions "
                      "not modelled")
        out.append(e)
    return sorted(out, key=lambda e: -e["hbm_bytes"])
