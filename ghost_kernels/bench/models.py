"""The Ghost modules of the models users run, as benchmark cases: ``--model`` and explicit shapes.

* :func:`build_model`: a model built from its config (no weights): timm's ``ghostnet_100``,
  ``ghostnetv2_100``, ``ghostnetv3_100`` (re-parameterized: its deployed form), Ultralytics'
  ``yolov8n-ghost``. A package that is not installed raises :class:`ModelUnavailable` saying so.
* :func:`model_shapes`: the distinct Ghost modules of such a model at an image size, each with how many
  of the model's modules have it, read off one forward pass on the CPU (batch 1) with hooks on the
  converted modules: their spec (activation, primary kernel and stride, cheap kernel) and input size.
* :func:`parse_shape`: one module written out, ``CIN->OUP@HxW[:kKsS][:ACT][:dwD][:rR]``, e.g.
  ``16->32@320x320:k3s2:silu:dw5`` (defaults: k1s1, relu, dw3, r2); :func:`format_shape` writes one.
* ``model_shapes.json`` (:data:`SNAPSHOT`): the distinct shapes of the models whose package the GPU
  machine lacks (ultralytics: no network there), at their users' image size, so that ``--model`` and
  the lab time them anyway; ``tests/test_bench.py`` holds it equal to what the package builds
  (remake it with ``python -c "from ghost_kernels.bench.models import write_snapshot; write_snapshot()"``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from typing import Dict, List, Optional, Tuple

from ..core.spec import ACTIVATIONS, GhostSpec, ModuleShape

# name -> (the package it needs, the image size its users run it at)
MODELS: Dict[str, Tuple[str, int]] = {
    "ghostnet_100": ("timm", 224), "ghostnetv2_100": ("timm", 224), "ghostnetv3_100": ("timm", 224),
    "yolov8n-ghost": ("ultralytics", 640),
}

SNAPSHOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_shapes.json")
SNAPSHOT_MODELS = ("yolov8n-ghost",)

_SHAPE = re.compile(r"^(\d+)->(\d+)@(\d+)x(\d+)((?::[a-z0-9]+)*)$")


class ModelUnavailable(RuntimeError):
    """The package a model is built with is not installed here."""


def parse_shape(text: str) -> ModuleShape:
    """``CIN->OUP@HxW[:kKsS][:ACT][:dwD][:rR]`` as a :class:`ModuleShape` (ValueError if malformed)."""
    m = _SHAPE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a shape: expected CIN->OUP@HxW[:kKsS][:ACT][:dwD][:rR], "
                         f"e.g. 16->32@320x320:k3s2:silu:dw5")
    inp, oup, h, w, opts = int(m[1]), int(m[2]), int(m[3]), int(m[4]), m[5]
    fields = dict(kernel_size=1, stride=1, act="relu", dw_size=3, ratio=2)
    for opt in filter(None, opts.split(":")):
        ks = re.fullmatch(r"k(\d+)(?:s(\d+))?", opt)
        if ks:
            fields["kernel_size"], fields["stride"] = int(ks[1]), int(ks[2] or 1)
        elif re.fullmatch(r"dw\d+", opt):
            fields["dw_size"] = int(opt[2:])
        elif re.fullmatch(r"r\d+", opt):
            fields["ratio"] = int(opt[1:])
        elif opt in ACTIVATIONS:
            fields["act"] = opt
        else:
            raise ValueError(f"{text!r}: unknown option {opt!r} (kKsS, dwD, rR, or one of {', '.join(ACTIVATIONS)})")
    return ModuleShape(text.strip(), GhostSpec(inp, oup, **fields), h, w)


def format_shape(spec: GhostSpec, h: int, w: int) -> str:
    """The text :func:`parse_shape` reads back into ``spec`` at ``h x w``."""
    return (f"{spec.inp}->{spec.oup}@{h}x{w}:k{spec.kernel_size}s{spec.stride}:{spec.act}:dw{spec.dw_size}"
            f":r{spec.ratio}")


def build_model(name: str):
    """The model ``name`` (:data:`MODELS`) on the CPU in eval mode, random weights, not converted."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    package = MODELS[name][0]
    try:
        if package == "timm":
            import timm
            model = timm.create_model(name, pretrained=False).eval()
            if name == "ghostnetv3_100":
                from timm.utils.model import reparameterize_model
                model = reparameterize_model(model)
            return model
        from ultralytics.nn.tasks import DetectionModel
        return DetectionModel(f"{name}.yaml", verbose=False).eval()
    except ImportError as exc:
        raise ModelUnavailable(f"{name} needs the {package} package, which is not importable here ({exc})") from None


def _snapshot() -> dict:
    with open(SNAPSHOT) as f:
        return json.load(f)


def write_snapshot(names=SNAPSHOT_MODELS) -> dict:
    """Build ``names`` (their packages installed) and write their shapes to :data:`SNAPSHOT`."""
    data = {}
    for name in names:
        data[name] = dict(image_size=MODELS[name][1], shapes=[
            dict(name=m.name, shape=format_shape(m.spec, m.h, m.w), count=c) for m, c in built_model_shapes(name)])
    with open(SNAPSHOT, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return data


def model_shapes(name: str, image_size: int = 0) -> List[Tuple[ModuleShape, int]]:
    """[(module shape, how many of the model's Ghost modules have it)], distinct, in network order:
    read off the built model, or from :data:`SNAPSHOT` at the model's own image size when its package is
    not installed here."""
    try:
        return built_model_shapes(name, image_size)
    except ModelUnavailable:
        snap = _snapshot().get(name)
        if snap is None or image_size not in (0, snap["image_size"]):
            raise
        return [(dataclasses.replace(parse_shape(e["shape"]), name=e["name"]), e["count"]) for e in snap["shapes"]]


def built_model_shapes(name: str, image_size: int = 0) -> List[Tuple[ModuleShape, int]]:
    """:func:`model_shapes` from the built model (ModelUnavailable without its package)."""
    import torch

    from .. import convert
    from ..module import FusedGhost

    model = convert(build_model(name), backend="torch")
    size = image_size or MODELS[name][1]
    seen: List[ModuleShape] = []
    hooks = [mod.register_forward_pre_hook(
        lambda mod, args, qual=qual: seen.append(ModuleShape(qual, mod.spec, args[0].shape[2], args[0].shape[3])))
        for qual, mod in model.named_modules() if isinstance(mod, FusedGhost)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    counts = Counter((s.spec, s.h, s.w) for s in seen)
    out, done = [], set()
    for s in seen:
        key = (s.spec, s.h, s.w)
        if key not in done:
            done.add(key)
            out.append((s, counts[key]))
    return out


def shape_cases(which: str = "all", model: Optional[str] = None, quick: bool = False,
                image_size: int = 0) -> List[Tuple[ModuleShape, int]]:
    """[(module shape, how many modules of the network have it)] for a ``--shapes`` value: ``all``,
    ``quick`` (the first shape per input resolution; also ``all`` with ``quick``), or a comma list of
    indices into the network's distinct shapes, module names and explicit shapes (:func:`parse_shape`,
    count 1). The network: GhostNet 1.0x at 224 (the stage table, no package needed), or ``model``
    (:data:`MODELS`, read off the built model). ValueError for a token that names nothing."""
    from ..core.spec import distinct_ghostnet_100_specs, ghostnet_100_modules

    if model is None:
        modules = ghostnet_100_modules()
        counts = Counter((m.spec, m.h, m.w) for m in modules)
        distinct = [(m, counts[(m.spec, m.h, m.w)]) for m in distinct_ghostnet_100_specs()]
        names = {m.name: m for m in modules}
    else:
        distinct = model_shapes(model, image_size)
        names = {m.name: m for m, _ in distinct}
    count_of = {(m.spec, m.h, m.w): c for m, c in distinct}
    toks = [t.strip() for t in str(which).split(",") if t.strip()]
    if toks == ["quick"] or (quick and toks == ["all"]):
        seen, out = set(), []
        for m, c in distinct:
            if m.h not in seen:
                seen.add(m.h)
                out.append((m, c))
        return out
    if toks == ["all"]:
        return distinct
    out = []
    for tok in toks:
        if "->" in tok:
            out.append((parse_shape(tok), 1))
        elif tok.isdigit():
            if int(tok) >= len(distinct):
                raise ValueError(f"shape index {tok}: {model or 'GhostNet 1.0x'} has {len(distinct)} distinct shapes")
            out.append(distinct[int(tok)])
        elif tok in names:
            m = names[tok]
            out.append((m, count_of.get((m.spec, m.h, m.w), 1)))
        else:
            raise ValueError(f"{tok!r} names no Ghost module of {model or 'GhostNet 1.0x'}: expected all, quick, or "
                             f"a comma list of shape indices, module names and shapes CIN->OUP@HxW[:kKsS][:ACT][:dwD][:rR]")
    return out
