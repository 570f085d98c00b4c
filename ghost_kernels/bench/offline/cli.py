"""The command line: ``python -m ghost_kernels.bench.offline`` (and :func:`add_arguments` /
:func:`run` for a parser that has some of the options already, e.g. ``python -m ghost_kernels.bench``)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from . import report
from .compiler import MAX_WORKERS
from .errors import OfflineError
from .runner import model, serve_request


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The offline model's options (those a parser does not have yet: ``python -m ghost_kernels.bench``
    already has --shapes, --batch and --out)."""
    have = set(getattr(parser, "_option_string_actions", {}))

    def add(flag, **kw):
        if flag not in have:
            parser.add_argument(flag, **kw)
    add("--out", default="offline-out", help="output folder (offline.json, offline.md)")
    add("--families", default=None, help="comma list of kernel families (default: every registered family)")
    add("--dtypes", default=None, help="comma list of bfloat16,float16,float32 (default: bfloat16)")
    add("--layouts", default=None, help="comma list of channels_last,nchw (default: channels_last)")
    add("--shapes", default="all", help="all (22 distinct GhostNet shapes), quick (one per resolution), or a "
                                        "comma list of indices / module names")
    add("--batch", type=int, default=256, help="batch size (default 256)")
    add("--workers", type=int, default=MAX_WORKERS, help=f"compile processes (at most {MAX_WORKERS})")
    add("--import", dest="imports", action="append", default=[],
        help="also import this module or .py file (it registers more families); repeatable")
    add("--strict", action="store_true", help="raise on the first error instead of recording it in the row")
    add("--quiet", action="store_true", help="no progress on stderr")
    return parser


def _csv(v, default):
    if v is None:
        return list(default)
    if isinstance(v, (list, tuple)):
        return list(v)
    return [t.strip() for t in str(v).split(",") if t.strip()]


def run(args) -> int:
    """Run the model for parsed ``args`` (from :func:`add_arguments`; also accepts the bench's
    singular ``--dtype``/``--layout``) and write ``offline.json`` and ``offline.md`` to ``args.out``."""
    dtypes = _csv(getattr(args, "dtypes", None) or getattr(args, "dtype", None), ("bfloat16",))
    layouts = _csv(getattr(args, "layouts", None) or getattr(args, "layout", None), ("channels_last",))
    families = _csv(getattr(args, "families", None), ()) or None
    batch = getattr(args, "batch", None) or 256
    out = getattr(args, "out", None) or "offline-out"
    verbose = not getattr(args, "quiet", False)
    rows, meta = model(families, getattr(args, "shapes", "all") or "all", dtypes, layouts, batch,
                       workers=getattr(args, "workers", MAX_WORKERS) or MAX_WORKERS,
                       imports=getattr(args, "imports", None) or (), strict=getattr(args, "strict", False),
                       verbose=verbose)
    print(report.write(out, rows, meta))
    print(f"{len(rows)} rows, {meta['variants']} compiled variants, {meta['wall_s']} s -> "
          f"{os.path.join(out, 'offline.json')}")
    return 1 if any(r.get("error") for r in rows) and getattr(args, "strict", False) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ghost_kernels.bench.offline",
                                     description="Offline sm_90 performance model of the Triton kernel families "
                                                 "(no GPU needed).")
    add_arguments(parser)
    parser.add_argument("--request", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.request:
        return serve_request(args.request, args.result)
    try:
        return run(args)
    except (OfflineError, ValueError) as exc:
        print(f"offline model: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
