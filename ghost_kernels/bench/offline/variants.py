"""Configurations of a kernel family to model (offline) and profile (the lab's ncu phase) beside its
default: e.g. ``triton_band`` with its K loop's old buffering (2 stages: one x box in shared memory)
against the default's ring of x boxes.

``VARIANTS`` is the hook: ``(family, variant) -> transform``, a function of the family's default
config that returns the variant's config, or None where the variant is the default itself (then it
is not profiled twice). For the offline model each variant is a family of its own, ``family:variant``,
registered by :func:`register` -- which runs when this file is given to the model as ``--import
ghost_kernels/bench/offline/variants.py`` (never on a plain import, so no other process sees the
extra families)."""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

Transform = Callable[[object], Optional[object]]


def old_buffering(cfg) -> Optional[object]:
    """band's K loop before the x ring: ``num_stages`` 2 (one x buffer: the load of step k+1 starts
    once step k has read its box). None when the default has 2 stages or fewer (nothing to compare)."""
    stages = getattr(cfg, "num_stages", None)
    return cfg._replace(num_stages=2) if stages is not None and stages > 2 else None


VARIANTS: Dict[Tuple[str, str], Transform] = {
    ("triton_band", "old_buffering"): old_buffering,
}
PATH = os.path.abspath(__file__)


def variant_name(family: str, variant: str) -> str:
    return f"{family}:{variant}"


def variant_config(family, variant: str, x, params, dtype):
    """The config of ``variant`` of the family object ``family`` for this call, or None where it is
    the default config."""
    spec = params.spec
    ho, wo = spec.out_hw(x.shape[2], x.shape[3])
    import torch
    default = family.default_config(spec, ho, wo, dtype, x.is_contiguous(memory_format=torch.channels_last))
    return VARIANTS[(family.name, variant)](default)


def register() -> list:
    """Register every variant as a family ``family:variant`` (its launcher: the family's, with the
    variant's config); the names registered."""
    from ghost_kernels.triton.family import FAMILIES, TritonFamily  # absolute: also loaded as a file
    names = []
    for family_name, variant in VARIANTS:
        base = FAMILIES.get(family_name)
        if base is None or base.default_config is None:
            continue

        def launcher(x, params, dtype, out=None, config=None, _base=base, _variant=variant):
            cfg = config or variant_config(_base, _variant, x, params, dtype)
            return _base.launcher(x, params, dtype, out=out, config=cfg)

        name = variant_name(family_name, variant)
        TritonFamily(name, f"{family_name} with the {variant} config", launcher=launcher,
                     default_config=base.default_config, extra_hbm_bytes=base.extra_hbm_bytes)
        names.append(name)
    return names


if __name__.startswith("_gk_offline_"):   # loaded by the offline model's --import (specialize.IMPORTED_PREFIX)
    register()
