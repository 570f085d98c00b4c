"""The command lines' shared parts (``python -m ghost_kernels.bench``, ``... .bench.offline``,
``... .bench.lab``, ``python -m ghost_kernels.info``): a parser whose errors are one line (exit code 2,
no traceback) naming the option, the bad value and what is accepted; help grouped, with each
option's default; one spelling per option (no abbreviations); and the value types, checked while the
command line is parsed."""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional, Sequence

from .models import MODELS

DTYPES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
LAYOUTS = ("channels_last", "nchw")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds ``(default: X)`` to every option with a default worth saying (not None, False or empty)
    whose help does not say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or default == []:
            return text
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        return f"{text} (default: {default})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with one-line errors and no abbreviated options (``--dtype`` is not
    ``--dtypes``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def comma_list(accepted: Sequence[str], aliases: Optional[Dict[str, str]] = None) -> Callable[[str], List[str]]:
    """A type for a comma list of ``accepted`` names (``aliases`` map to them): the list, in order,
    without repeats."""
    aliases = aliases or {}

    def parse(text: str) -> List[str]:
        out: List[str] = []
        for tok in (t.strip() for t in str(text).split(",")):
            name = aliases.get(tok, tok)
            if name not in accepted:
                raise argparse.ArgumentTypeError(f"{tok!r} is not one of {', '.join(accepted)}")
            if name not in out:
                out.append(name)
        return out
    return parse


def shape_tokens(text: str) -> List[str]:
    """The tokens of a ``--shapes`` value, each checked: ``all``, ``quick``, or a comma list of indices
    into GhostNet 1.0x's distinct module shapes, of its Ghost modules' names, and of explicit shapes
    (``16->32@320x320:k3s2:silu:dw5``: ``models.parse_shape``). Raises ValueError. (With ``--model``
    the indices and names are the model's, checked when its shapes are read: :func:`model_shapes_arg`.)"""
    from ..core.spec import distinct_ghostnet_100_specs, ghostnet_100_modules
    from .models import parse_shape

    text = str(text).strip()
    if text in ("all", "quick"):
        return [text]
    names = [m.name for m in ghostnet_100_modules()]
    n = len(distinct_ghostnet_100_specs())
    toks = [t.strip() for t in text.split(",")]
    for tok in toks:
        if "->" in tok:
            parse_shape(tok)          # ValueError saying what is wrong with it
            continue
        if (tok.isdigit() and int(tok) < n) or tok in names:
            continue
        raise ValueError(f"{tok!r} is not a GhostNet 1.0x Ghost module: expected all, quick, or a comma list of "
                         f"shape indices 0-{n - 1}, module names ({names[0]} ... {names[-1]}) and shapes "
                         f"CIN->OUP@HxW[:kKsS][:ACT][:dwD][:rR]")
    return toks


def shapes(text: str) -> str:
    """The ``--shapes`` type: the value, once every token is checked (:func:`shape_tokens`)."""
    try:
        shape_tokens(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return str(text).strip()


def model_name(text: str) -> str:
    """The ``--model`` type: one of ``models.MODELS``."""
    if text not in MODELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a model here: expected one of {', '.join(MODELS)}")
    return text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (>= 0)")
    return value


def add_cases(group, batch_default: Optional[int], batch_help: str) -> None:
    """The options that say what runs, shared by the bench's timing and the offline model:
    --shapes, --dtypes, --layouts, --batch."""
    group.add_argument("--shapes", type=str, default="all", metavar="all|quick|LIST",
                       help="'all' (every distinct Ghost module shape of the network: GhostNet 1.0x at 224x224, 22, "
                            "or --model's), 'quick' (one per resolution), or a comma list of module names "
                            "(blocks.1.0.ghost1), indices into the distinct shapes (0-21) and explicit shapes "
                            "CIN->OUP@HxW[:kKsS][:ACT][:dwD][:rR] (e.g. 16->32@320x320:k3s2:silu:dw5)")
    group.add_argument("--model", type=model_name, default=None, metavar="|".join(MODELS),
                       help="the Ghost modules of this model (built from its config, random weights, at the image "
                            "size its users run: " + ", ".join(f"{k} {v[1]}" for k, v in MODELS.items())
                            + ") instead of GhostNet 1.0x's")
    group.add_argument("--dtypes", type=comma_list(DTYPES, DTYPE_ALIASES), default="bfloat16", metavar="LIST",
                       help=f"comma list of {', '.join(DTYPES)}")
    group.add_argument("--layouts", type=comma_list(LAYOUTS), default="channels_last", metavar="LIST",
                       help=f"comma list of {', '.join(LAYOUTS)}")
    group.add_argument("--batch", type=positive_int, default=batch_default, metavar="N", help=batch_help)


def check_shapes(parser: argparse.ArgumentParser, args) -> None:
    """After parsing: ``--shapes`` checked against the network (GhostNet 1.0x, or ``--model``'s, whose
    package must be importable): a parse error naming the option and the value otherwise."""
    from .models import ModelUnavailable, shape_cases
    try:
        if getattr(args, "model", None):
            args.shape_cases = shape_cases(args.shapes, args.model)
        else:
            shape_tokens(args.shapes)
    except ModelUnavailable as exc:
        parser.error(f"argument --model: {exc}")
    except ValueError as exc:
        parser.error(f"argument --shapes: {exc}")


def given(argv: Sequence[str]) -> set:
    """The option strings on a command line (``--opt value`` and ``--opt=value``)."""
    return {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
