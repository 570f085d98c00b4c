"""Style checks held in CI: the package's layers (no import, lazy or not, from a lower layer up), the
size of its files, and the conventions that keep the registered ops loadable on old stacks."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "ghost_kernels")

# Lowest first. A module may import from its own layer and the layers below; packages that share a
# layer (triton, cuda) may not import each other.
LAYERS = [
    {"ghost_kernels._version", "ghost_kernels.testing", "ghost_kernels.core"},
    {"ghost_kernels.triton", "ghost_kernels.cuda"},
    {"ghost_kernels.dispatch"},
    {"ghost_kernels.module"},
    {"ghost_kernels.integrations"},
    {"ghost_kernels.convert"},
    {"ghost_kernels", "ghost_kernels.info", "ghost_kernels.bench"},   # the package's face and its tools
]
MAX_LINES = 450


def package_files():
    for dirpath, _, files in os.walk(PKG):
        if "__pycache__" in dirpath:
            continue
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def unit_of(name):
    """The LAYERS entry a dotted module name belongs to (the longest matching prefix)."""
    best = None
    for layer, units in enumerate(LAYERS):
        for unit in units:
            if (name == unit or name.startswith(unit + ".")) and (best is None or len(unit) > len(best[1])):
                best = (layer, unit)
    return best


def imports_of(path):
    """(line, imported module) for every import in the file, at any depth (lazy ones too)."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.startswith("ghost_kernels"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("ghost_kernels"):
                target = node.module
            else:
                continue
            for a in node.names:   # `from . import x` imports the module target.x when there is one
                sub = f"{target}.{a.name}"
                is_module = os.path.exists(os.path.join(ROOT, *sub.split(".")) + ".py") or \
                    os.path.isdir(os.path.join(ROOT, *sub.split(".")))
                yield node.lineno, sub if is_module else target


def test_no_import_from_a_lower_layer_up():
    wrong = []
    for path in package_files():
        here = unit_of(module_name(path))
        assert here is not None, f"{module_name(path)} belongs to no layer: add it to LAYERS"
        for line, target in imports_of(path):
            there = unit_of(target)
            if target == "ghost_kernels._C" or there is None:
                continue
            if there[0] > here[0] or (there[0] == here[0] and there[1] != here[1] and here[0] > 0
                                      and not here[1].startswith(there[1])):
                wrong.append(f"{os.path.relpath(path, ROOT)}:{line} ({here[1]}) imports {target} ({there[1]})")
    assert not wrong, "imports from a lower layer up:\n" + "\n".join(wrong)


def test_the_layer_check_catches_a_lazy_import(tmp_path):
    """The check itself: a lazy import of a higher layer inside a function is found."""
    fake = os.path.join(PKG, "core", "params.py")
    tree_imports = list(imports_of(fake))
    assert all(unit_of(t)[0] == 0 for _, t in tree_imports), tree_imports
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..module import GhostModule\n")
    # resolve as if it lived in ghost_kernels/core/
    node = ast.parse(probe.read_text()).body[0].body[0]
    base = "ghost_kernels.core".split(".")[:2 - node.level + 1]
    assert unit_of(".".join(base + [node.module]))[1] == "ghost_kernels.module"


@pytest.mark.parametrize("path", list(package_files()), ids=lambda p: os.path.relpath(p, PKG))
def test_files_stay_small(path):
    n = sum(1 for _ in open(path))
    assert n <= MAX_LINES, f"{os.path.relpath(path, ROOT)} has {n} lines (> {MAX_LINES}): split it along a seam"


def test_op_files_have_no_postponed_annotations():
    """torch 2.6's custom_op evaluates string annotations in its own namespace: a file that registers
    an op with ``torch.library.custom_op`` must not use ``from __future__ import annotations``."""
    offenders = []
    for path in package_files():
        src = open(path).read()
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                     any(a.name == "annotations" for a in n.names) for n in ast.parse(src).body)
        if "torch.library.custom_op(" in src and future:
            offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, offenders


def test_every_kernel_family_opens_with_a_design_note():
    """flash-attention style: each Triton family file (the one that registers its backend object) and
    the training kernels' file start with the design note of their kernels."""
    short, families = [], 0
    for f in sorted(os.listdir(os.path.join(PKG, "triton"))):
        src = open(os.path.join(PKG, "triton", f)).read() if f.endswith(".py") else ""
        if "= TritonFamily(" in src or f == "train_kernels.py":
            families += 1
            doc = ast.get_docstring(ast.parse(src)) or ""
            if len(doc.splitlines()) < 10:
                short.append(f)
    assert families >= 4
    assert not short, f"no design note (module docstring of 3+ lines): {short}"
