"""The cases and their launches: shapes, dtypes, layouts and the registered kernel families, CPU
inputs of the real shapes, and the launches one call of a family's launcher makes, recorded by
:func:`ghost_kernels.triton.common.capture_launches` instead of run."""
from __future__ import annotations

import importlib
import os
from typing import Any, Dict, Sequence

from .specialize import load_module_file

DTYPES = ("bfloat16", "float16", "float32")
LAYOUTS = ("channels_last", "nchw")


def _torch_dtype(name):
    import torch
    if not isinstance(name, str):
        return name
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                "half": torch.float16, "float32": torch.float32, "fp32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"dtype {name!r}: expected one of {DTYPES}") from None


def _dtype_name(dt) -> str:
    import torch
    return {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}.get(dt, str(dt))


def select_shapes(which="all") -> list:
    """``all`` (the 22 distinct GhostNet-1.0 shapes), ``quick`` (the first per resolution), or a comma
    list of indices into them / module names (``blocks.1.0.ghost1``); a list of ModuleShape passes."""
    from ...core.spec import distinct_ghostnet_100_specs, ghostnet_100_modules
    if not isinstance(which, str):
        return list(which)
    distinct = distinct_ghostnet_100_specs()
    if which == "all":
        return distinct
    if which == "quick":
        seen, out = set(), []
        for m in distinct:
            if m.h not in seen:
                seen.add(m.h)
                out.append(m)
        return out
    by_name = {}
    for m in ghostnet_100_modules():
        by_name.setdefault(m.name, m)
    out = []
    for tok in filter(None, (t.strip() for t in which.split(","))):
        if not tok.isdigit():
            if tok not in by_name:
                raise ValueError(f"unknown module {tok!r} (names look like blocks.1.0.ghost1)")
            out.append(by_name[tok])
        elif int(tok) < len(distinct):
            out.append(distinct[int(tok)])
        else:
            raise ValueError(f"shape index {tok}: there are {len(distinct)} distinct shapes")
    return out


FAMILY_MODULES = ("ghost_kernels.triton.halo", "ghost_kernels.triton.two_pass", "ghost_kernels.triton.band")
# Trees before the package's layout change (the offline model can be pointed at an older checkout):
# the families were flat modules ghost_kernels.triton_<family>.
_FLAT_FAMILY_MODULES = ("triton_halo", "triton_two_pass", "triton_band")


IMPORT_ERRORS: Dict[str, str] = {}   # family modules that exist but failed to import (module -> error)


def _family_module_names() -> list:
    """Every module that may register a family: those of ``ghost_kernels.triton`` (or, in an older
    tree, every ``ghost_kernels.triton_*`` module)."""
    import pkgutil

    import ghost_kernels
    try:
        import ghost_kernels.triton as package
    except ImportError:
        package = None
    if package is not None and hasattr(package, "__path__"):
        names = list(FAMILY_MODULES)
        names += [f"ghost_kernels.triton.{i.name}" for i in pkgutil.iter_modules(package.__path__)
                  if f"ghost_kernels.triton.{i.name}" not in names]
        return names
    names = [f"ghost_kernels.{n}" for n in _FLAT_FAMILY_MODULES]
    names += [f"ghost_kernels.{i.name}" for i in pkgutil.iter_modules(ghost_kernels.__path__)
              if i.name.startswith("triton_") and f"ghost_kernels.{i.name}" not in names]
    return names


def _family_registry():
    try:
        from ...triton import family
    except ImportError:   # an older tree
        family = importlib.import_module("ghost_kernels.triton_family")
    return family


def load_families(imports: Sequence[str] = ()) -> Dict[str, Any]:
    """The launcher of every registered family (name -> launcher) after importing every module of
    ``ghost_kernels.triton`` (family files register themselves; a module that fails to import is
    recorded in IMPORT_ERRORS and skipped) and ``imports`` (module names or .py files that register
    more; errors propagate)."""
    triton_family = _family_registry()
    for name in _family_module_names():
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:
            IMPORT_ERRORS[name] = f"{type(exc).__name__}: {exc}"
    for imp in imports:
        if imp.endswith(".py") or os.sep in imp:
            load_module_file(imp)
        else:
            importlib.import_module(imp)
    # FAMILIES holds TritonFamily objects (in older trees the launchers themselves). The launcher is
    # called without a config: its default tiling, which is what a GPU without measurements runs.
    return {name: getattr(fam, "launcher", fam) for name, fam in triton_family.FAMILIES.items()}


def make_inputs(shape, dtype, layout: str, batch: int, seed: int = 0):
    """(x, params) on the CPU: x uninitialized (torch.empty: no memory touched), weights and BN
    random, all in ``dtype`` (the bench's ``module.to(dtype)``)."""
    import torch

    from ...core.params import BatchNormState, GhostParams
    spec = shape.spec
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty((batch, spec.inp, shape.h, shape.w), dtype=dtype, memory_format=fmt)

    def bn(c):
        return BatchNormState(torch.randn(c, generator=g).to(dtype), torch.randn(c, generator=g).to(dtype),
                              torch.randn(c, generator=g).to(dtype), (torch.rand(c, generator=g) + 0.5).to(dtype),
                              torch.zeros((), dtype=torch.long), 0.1, 1e-5, True)
    k, d = spec.kernel_size, spec.dw_size
    w1 = torch.randn(spec.m, spec.inp, k, k, generator=g).to(dtype)
    wd = torch.randn(spec.new, 1, d, d, generator=g).to(dtype)
    return x, GhostParams(w1, bn(spec.m), wd, bn(spec.new), spec)


def capture(launcher, x, params, dtype) -> list:
    """The launches one call of ``launcher`` makes (recorded, not run)."""
    from ...triton import common as tc
    with tc.capture_launches() as rec:
        launcher(x, params, dtype)
    return list(rec)



def _interpreting() -> bool:
    try:
        from ...triton import common as tc
        if tc.interpreting():
            return True
    except Exception:
        pass
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
