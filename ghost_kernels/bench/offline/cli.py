"""The command line: ``python -m ghost_kernels.bench.offline`` (and :func:`add_arguments` /
:func:`run` for a parser that has some of the options already, e.g. ``python -m ghost_kernels.bench``)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

from ..args import Parser, add_cases, check_shapes, positive_int
from . import report
from .compiler import MAX_WORKERS
from .errors import OfflineError
from .runner import model, serve_request


def add_arguments(parser: argparse.ArgumentParser, groups: Optional[Dict[str, object]] = None
                  ) -> argparse.ArgumentParser:
    """The offline model's options, in argument groups (``groups``: "cases", "offline", "output";
    made on ``parser`` when not given). Options the parser has already are not added again:
    ``python -m ghost_kernels.bench`` has --shapes, --dtypes, --layouts, --batch and --out."""
    have = set(getattr(parser, "_option_string_actions", {}))
    groups = dict(groups or {})
    for key, title in (("cases", "what is modelled"), ("offline", "offline model options"), ("output", "output")):
        if key not in groups:
            groups[key] = parser.add_argument_group(title)
    if "--shapes" not in have:
        add_cases(groups["cases"], 256, "batch size")
    off = groups["offline"]
    off.add_argument("--families", type=_families, default=None, metavar="LIST",
                     help="comma list of kernel families (default: every registered family: "
                          f"{', '.join(_registered_families())})")
    off.add_argument("--train", action="store_true",
                     help="the training ops instead of the inference families: per module a forward and a backward "
                          "row (Triton launches modelled, torch ops counted by bytes) against the training floor "
                          "-> offline-train.json, offline-train.md (ghost_kernels/bench/offline/train.py)")
    off.add_argument("--workers", type=positive_int, default=MAX_WORKERS, metavar="N",
                     help=f"compile processes (at most {MAX_WORKERS})")
    off.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                     help="also import this module or .py file (it registers more families); repeatable")
    off.add_argument("--strict", action="store_true",
                     help="raise on the first error instead of recording it in the row")
    off.add_argument("--quiet", action="store_true", help="no progress on stderr")
    if "--out" not in have:
        groups["output"].add_argument("--out", default="offline-out", metavar="DIR",
                                      help="output folder (offline.json, offline.md)")
    return parser


def _registered_families() -> List[str]:
    from ...triton.family import FAMILIES
    return sorted(FAMILIES)


def _families(text: str) -> List[str]:
    """The --families type: a comma list, each name checked against the registered families by
    :func:`check_families` once --import has run (it can register more)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def check_families(parser: argparse.ArgumentParser, args) -> None:
    """After parsing: import what --import names and check --families against the registered families
    (a parse error naming the option and the value otherwise)."""
    imports, families = getattr(args, "imports", None) or [], getattr(args, "families", None)
    if not imports and not families:
        return
    from .cases import load_families
    try:
        registered = sorted(load_families(imports))
    except Exception as exc:   # a module or file named by --import that cannot be imported
        parser.error(f"argument --import: {' '.join(imports)!r} failed to import: {type(exc).__name__}: {exc}")
    for name in families or ():
        if name not in registered:
            parser.error(f"argument --families: {name!r} is not a registered kernel family: expected a comma list "
                         f"of {', '.join(registered)}")


def _csv(v, default):
    if v is None:
        return list(default)
    if isinstance(v, (list, tuple)):
        return list(v)
    return [t.strip() for t in str(v).split(",") if t.strip()]


def run(args) -> int:
    """Run the model for parsed ``args`` (from :func:`add_arguments`) and write ``offline.json`` and
    ``offline.md`` to ``args.out``."""
    dtypes = _csv(getattr(args, "dtypes", None), ("bfloat16",))
    layouts = _csv(getattr(args, "layouts", None), ("channels_last",))
    families = _csv(getattr(args, "families", None), ()) or None
    batch = getattr(args, "batch", None) or 256
    out = getattr(args, "out", None) or "offline-out"
    verbose = not getattr(args, "quiet", False)
    shapes = getattr(args, "shapes", "all") or "all"
    if getattr(args, "train", False):
        return run_train(args, dtypes, layouts, batch, out, verbose, shapes)
    if getattr(args, "model", None) or "->" in shapes:      # the model's modules, explicit shapes
        from ..models import shape_cases
        shapes = [m for m, _ in (getattr(args, "shape_cases", None) or shape_cases(shapes, args.model))]
    rows, meta = model(families, shapes, dtypes, layouts, batch,
                       workers=getattr(args, "workers", MAX_WORKERS) or MAX_WORKERS,
                       imports=getattr(args, "imports", None) or (), strict=getattr(args, "strict", False),
                       verbose=verbose)
    meta["network"] = getattr(args, "model", None) or "ghostnet_100"   # whose modules (explicit shapes besides)
    print(report.write(out, rows, meta))
    print(f"{len(rows)} rows, {meta['variants']} compiled variants, {meta['wall_s']} s -> "
          f"{os.path.join(out, 'offline.json')}")
    return 1 if any(r.get("error") for r in rows) and getattr(args, "strict", False) else 0


def run_train(args, dtypes, layouts, batch, out, verbose, shapes) -> int:
    """``--train``: the training ops' rows (:func:`train.model_train`) for the network's modules, each
    distinct shape weighted by how many modules have it (``models.shape_cases``)."""
    from ..models import shape_cases
    from . import train
    if getattr(args, "families", None):
        raise ValueError("--train models the training ops, not the inference families: drop --families")
    cases = getattr(args, "shape_cases", None) or shape_cases(shapes, getattr(args, "model", None))
    rows, meta = train.model_train(cases, dtypes, layouts, batch,
                                   workers=getattr(args, "workers", MAX_WORKERS) or MAX_WORKERS,
                                   strict=getattr(args, "strict", False), verbose=verbose)
    meta["network"] = getattr(args, "model", None) or "ghostnet_100"
    train.write(out, rows, meta)
    for phase, v in meta["summary"].items():
        print(f"{phase}: {v['modules']} modules, {v['hbm_bytes'] / 1e9:.2f} GB against a floor of "
              f"{v['floor_bytes'] / 1e9:.2f} GB ({v['bytes_over_floor'] or 0:.2f}x; torch ops "
              f"{v['torch_bytes'] / 1e9:.2f} GB), worst kernel {v['max_kernel_instr_per_byte'] or 0:.3f} "
              f"warp-instr/B ({v['worst_kernel']}), spills {v['spills']}, {v['predicted_us']:.0f} us predicted"
              + (f"; {v['errors']} rows without numbers (see their error)" if v["errors"] else ""))
    print(f"{len(rows)} rows, {meta['variants']} compiled variants, {meta['wall_s']} s -> "
          f"{os.path.join(out, 'offline-train.json')}")
    return 1 if any(r.get("error") for r in rows) and getattr(args, "strict", False) else 0


def run_reporting(args, prog: str) -> int:
    """:func:`run`, with the model's own errors (a family's launcher failing under --strict, say) as
    one line and exit code 2."""
    try:
        return run(args)
    except (OfflineError, ValueError) as exc:
        print(f"{prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m ghost_kernels.bench.offline",
                    description="Offline sm_90 performance model of the Triton kernel families (no GPU needed).")
    add_arguments(parser)
    parser.add_argument("--request", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.request:
        return serve_request(args.request, args.result)
    check_shapes(parser, args)
    check_families(parser, args)
    return run_reporting(args, "offline model")
