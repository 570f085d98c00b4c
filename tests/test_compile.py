"""torch.compile, torch.export and torch.library: the fused forward and the training ops are registered
ops (fake implementations, register_autograd, opcheck); a converted GhostNet compiles with
fullgraph=True and zero graph breaks in eval and train mode; export works for inference.

On the CPU the compiled graphs run the kernels in the Triton interpreter with the aot_eager backend
(Inductor would compile C++ for minutes on two cores); on a GPU the backend is Inductor."""
import copy
import dataclasses
import itertools

import pytest
import torch
from helpers import (
    DEVICE,
    FAMILIES,
    FORMS,
    LAYOUTS,
    OfficialGhost,
    RandomGhost,
    make_x,
    randomize,
    rel_err,
    small_ghost_net,
)
from torch import nn

import ghost_kernels as gk
from ghost_kernels.core.params import op_args
from ghost_kernels.core.spec import ACTIVATIONS

timm = pytest.importorskip("timm")
COMPILER = "inductor" if DEVICE == "cuda" else "aot_eager"


def compiled(model):
    from torch._dynamo.utils import counters
    counters.clear()
    torch._dynamo.reset()
    return torch.compile(model, backend=COMPILER, fullgraph=True)


def graph_breaks():
    from torch._dynamo.utils import counters
    return dict(counters["graph_break"])


# The option sweep for opcheck: every ratio x dw_size x stride, with the activation, odd/even oup,
# layout, BN affine and running statistics rotating through the points.
OP_SWEEP = [(i, r, d, s) for i, (r, d, s) in enumerate(itertools.product([2, 3, 4], [1, 3, 5, 7], [1, 2]))]


def sweep_point(i, ratio, dw, stride):
    spec = gk.GhostSpec(3 + i % 4, 2 * ratio + (i % 2) + 2 * (i % 3), ratio=ratio, dw_size=dw, stride=stride,
                        act=("relu", "none")[i % 2])
    return spec, LAYOUTS[(i // 2) % 2], (i // 4) % 2 == 0, (i // 3) % 2 == 0   # spec, layout, affine, running


def forward_point(i, ratio, dw, stride, kernel_size=1):
    """A sweep point of the inference ops: the activation (all four) and the affine form
    (helpers.FORMS) rotate too: ``(x, RandomGhost)``."""
    spec, layout, affine, _ = sweep_point(i, ratio, dw, stride)
    spec = dataclasses.replace(spec, act=ACTIVATIONS[i % 4], kernel_size=kernel_size)
    p = RandomGhost(spec, DEVICE, **FORMS[list(FORMS)[(i // 4) % 4]])
    if not affine and p.bn1 is not None:
        p.bn1 = p.bn1._replace(weight=None, bias=None)
        p.bn2 = p.bn2._replace(weight=None, bias=None)
    x = make_x(2, spec.inp, 5 + i % 3, 4 + i % 4, torch.float32, layout)
    return x, p


@pytest.mark.parametrize("i,ratio,dw,stride", OP_SWEEP)
def test_triton_forward_op_passes_opcheck(i, ratio, dw, stride):
    """The inference op: schema, fake tensor (exact strides), autograd registration and AOT dispatch,
    over the option sweep, the families taking turns (one op and one fake implementation for all;
    each family's own sweep runs in test_triton_forward.py); GhostNetV2's gate on half of
    triton_band's points, a 3x3 primary conv on half of triton_two_pass's."""
    fam = FAMILIES[i % len(FAMILIES)]
    x, p = forward_point(i, ratio, dw, stride, 3 if fam == "triton_two_pass" and i % 2 else 1)
    gate = None
    if fam == "triton_band" and i % 2:
        ho, wo = p.spec.out_hw(*x.shape[2:])
        gate = torch.rand(2, p.spec.oup, (ho + 1) // 2, (wo + 1) // 2, device=DEVICE)
    args = (x, *op_args(p.params), gate, torch.float32, fam)
    torch.library.opcheck(torch.ops.ghost_kernels.triton_forward.default, args)


def test_converted_ghostnet_compiles_fullgraph_in_eval():
    from torch._dynamo.utils import counters

    model = randomize(timm.create_model("ghostnet_100", pretrained=False, num_classes=10)).to(DEVICE).eval()
    original = copy.deepcopy(model)
    gk.convert(model, backend="triton")
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    counters.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        ref, eager = original.double()(x.double()), original.float()(x)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref) + 1e-6


def train_op_args(spec, layout, batch_stats=True, affine=True, conv_bias=False):
    p = RandomGhost(spec, DEVICE, conv_bias=conv_bias)
    hw = (6, 7) if spec.dw_size < 7 else (4, 5)   # dw 7: the backward's 6-pixel halo makes big interpreter tiles
    x = make_x(2, spec.inp, *hw, torch.float32, layout)
    w = lambda t: t.clone().requires_grad_() if affine else None  # noqa: E731
    b = lambda t: None if t is None else t.clone().requires_grad_()  # noqa: E731
    stats = (None, None, None, None) if batch_stats else (p.bn1.running_mean, p.bn1.running_var,
                                                          p.bn2.running_mean, p.bn2.running_var)
    return (x.requires_grad_(), p.w1.clone().requires_grad_(), b(p.b1), w(p.bn1.weight), w(p.bn1.bias),
            p.wd.clone().requires_grad_(), b(p.b2), w(p.bn2.weight), w(p.bn2.bias), *stats, 1e-5, 1e-3, spec.oup,
            spec.stride, spec.ratio, spec.dw_size, spec.act, -1)


@pytest.mark.parametrize("i,ratio,dw,stride", OP_SWEEP)
def test_train_ops_pass_opcheck(i, ratio, dw, stride):
    """Schema, fake tensor (exact strides of every output), autograd registration and AOT dispatch of
    the forward op (whose autograd formula calls the backward op), and of the backward op itself,
    over the option sweep (ratio 2 with one channel block used to return a non-contiguous dL/dwd);
    the activation (all four) and conv biases rotate too (every pairing within the first 8 points)."""
    spec, layout, affine, running = sweep_point(i, ratio, dw, stride)
    spec = dataclasses.replace(spec, act=ACTIVATIONS[i % 4])
    conv_bias = (i // 4) % 2 == 1
    mode = "eval" if running and i % 3 == 0 else "train"
    args = train_op_args(spec, layout, batch_stats=mode != "eval", affine=affine, conv_bias=conv_bias)
    torch.library.opcheck(torch.ops.ghost_kernels.triton_train_forward.default, args)
    out, mean1, invstd1, _, mean2, invstd2, _ = torch.ops.ghost_kernels.triton_train_forward(*args)
    grad = torch.randn_like(out)
    tensors = (a.detach() if a is not None else None for a in args[:9])   # x, w1, b1, bn1 w/b, wd, b2, bn2 w/b
    bargs = (grad, *tensors, mean1.detach(), invstd1.detach(), mean2.detach(), invstd2.detach(),
             spec.oup, spec.stride, spec.ratio, spec.dw_size, spec.act, mode != "eval", mode != "eval", -1)
    torch.library.opcheck(torch.ops.ghost_kernels.triton_train_backward.default, bargs)


def ghost_outputs(model):
    """Forward hooks that collect (name, output) of every Ghost module, in call order."""
    seen = []
    for name, mod in model.named_modules():
        if isinstance(mod, gk.GhostModule):
            mod.register_forward_hook(lambda m, i, o, name=name: seen.append((name, o.detach().clone())))
    return seen


def test_converted_ghostnet_compiles_fullgraph_in_train_mode():
    """Train mode: batch statistics, running-statistics updates and the autograd formula in one graph
    (AOTAutograd traces the backward op too): zero graph breaks, and the same activations and running
    statistics as the converted model on the PyTorch path. Compared where BatchNorm is well conditioned: a
    train-mode BN over a handful of values per channel (the 1x1 maps of a 32x32 input at batch 2)
    turns rounding differences into O(1) ones in eager PyTorch itself (float32 against float64 there:
    ~0.7 relative error); on a GPU the input is large enough to compare the logits."""
    n, hw = (8, 96) if DEVICE == "cuda" else (2, 32)
    model = randomize(timm.create_model("ghostnet_100", pretrained=False, num_classes=10)).to(DEVICE).train()
    gk.convert(model, backend="triton")
    twin = copy.deepcopy(model)
    for mod in twin.modules():   # the twin runs the PyTorch path: the oracle, and no interpreter time
        if isinstance(mod, gk.GhostModule):
            mod.backend = "torch"
    got, want = ghost_outputs(model), ghost_outputs(twin)
    x = torch.randn(n, 3, hw, hw, device=DEVICE)
    out = compiled(model)(x)
    assert not graph_breaks(), graph_breaks()
    ref = twin(x)
    assert len(got) == len(want) == 32
    well_conditioned = [(name, a, b) for (name, a), (_, b) in zip(got, want) if a.shape[0] * a.shape[2] * a.shape[3] >= 128]
    assert len(well_conditioned) >= 7  # the 16x16 and 8x8 stages at 32x32
    for name, a, b in well_conditioned:
        assert rel_err(a, b) < 1e-4, name
    for name, mod in model.named_modules():
        if isinstance(mod, gk.GhostModule) and any(name == w[0] for w in well_conditioned):
            other = twin.get_submodule(name)
            for (bname, a), (_, b) in zip(mod.named_buffers(), other.named_buffers()):
                assert rel_err(a, b) < 1e-4 if a.is_floating_point() else torch.equal(a, b), f"{name}.{bname}"
    if DEVICE == "cuda":  # logits and the backward too (minutes of interpreter time on the CPU)
        assert rel_err(out, ref) < 1e-3
        out.square().mean().backward()
        ref.square().mean().backward()
        for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
            assert rel_err(a.grad, b.grad) < 1e-2, name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compiled_training_step_matches_eager(mode):
    """Forward and backward of a converted GhostNet-style network under torch.compile(fullgraph=True),
    with the shortcut added in place into a fused output: zero graph breaks, same loss and gradients."""
    torch.manual_seed(0)
    model = gk.convert(small_ghost_net().to(DEVICE), backend="triton")
    getattr(model, mode)()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 12, 12, device=DEVICE)
    loss = compiled(model)(x).square().mean()
    loss.backward()
    assert not graph_breaks(), graph_breaks()
    loss_ref = twin(x).square().mean()
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert rel_err(a.grad, b.grad) < 1e-4, name


@pytest.mark.parametrize("grad_mode", ["no_grad", "grad"])
def test_export_for_inference(grad_mode):
    """torch.export of a converted network in eval mode: the fused ops are in the exported graph and
    the exported program computes what the module does (with and without grad mode at export time)."""
    torch.manual_seed(0)
    model = randomize(gk.convert(small_ghost_net().to(DEVICE), backend="triton")).eval()
    x = torch.randn(2, 3, 12, 12, device=DEVICE)
    ctx = torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad()
    with ctx:
        ep = torch.export.export(model, (x,))
        graph = str(ep.graph)
        assert "ghost_kernels" in graph, graph
        got = ep.module()(x)
        ref = model(x)
    assert rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("mode,act", [("train", "relu"), ("eval", "relu"), ("train", "silu"), ("train", "hardswish")])
def test_inductor_compiles_a_converted_network(mode, act):
    """torch.compile with the default Inductor backend (on the CPU too: that is where the strides bug
    of the backward op showed), fullgraph=True, forward and backward, train and eval mode: the same
    loss and gradients as eager; with SiLU (Ultralytics' activation) and Hardswish in train mode too (the
    training ops' forward and derivative of each in one graph)."""
    torch.manual_seed(0)
    net = small_ghost_net()
    if act != "relu":
        for mod in list(net.modules()):
            for name, child in mod.named_children():
                if isinstance(child, nn.ReLU):
                    setattr(mod, name, {"silu": nn.SiLU, "hardswish": nn.Hardswish}[act]())
    model = randomize(gk.convert(net.to(DEVICE), backend="triton"))
    if act != "relu":
        assert {m.spec.act for m in model.modules() if isinstance(m, gk.FusedGhost)} == {act, "none"}
    getattr(model, mode)()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 12, 12, device=DEVICE)
    torch._dynamo.reset()
    loss = torch.compile(model, backend="inductor", fullgraph=True)(x).square().mean()
    loss.backward()
    loss_ref = twin(x).square().mean()
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    # Inductor reorders float arithmetic: compare each gradient to 1e-4 of its norm, with a floor of
    # 1e-6 of the whole gradient's norm (a BN bias followed by a train-mode BN has a zero gradient in
    # exact arithmetic, and rounding noise on both sides)
    total = torch.cat([b.grad.flatten() for b in twin.parameters()]).norm().item()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert (a.grad - b.grad).norm().item() <= 1e-4 * b.grad.norm().item() + 1e-6 * total, name
    for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        assert rel_err(a, b) < 1e-5 if a.is_floating_point() else torch.equal(a, b), name


class _DeployedGhost(nn.Module):
    """A deployed Ghost module (GhostNetV3 after reparameterization, Ultralytics after fuse()): convs
    with a bias, no BatchNorm."""

    def __init__(self, inp, oup, act):
        super().__init__()
        self.oup = oup
        m = (oup + 1) // 2
        self.primary_conv = nn.Sequential(nn.Conv2d(inp, m, 1, bias=True), act())
        self.cheap_operation = nn.Sequential(nn.Conv2d(m, m, 3, 1, 1, groups=m, bias=True), act())

    def forward(self, x):
        x1 = self.primary_conv(x)
        return torch.cat([x1, self.cheap_operation(x1)], 1)[:, :self.oup]


def test_inductor_compiles_every_kernel_option():
    """One Inductor graph (fullgraph=True, eval, no_grad) through modules that span the inference
    options: SiLU and Hardswish, a 3x3 stride-2 primary conv with a 5x5 cheap conv (Ultralytics'
    downsampling GhostConv), a deployed module (biased convs, no BatchNorm), GhostNetV2's attention
    gate; each runs ghost_kernels::forward (backend "triton", the family chosen per call), and the
    whole equals the unconverted network within 2x eager's error against float64."""
    from timm.models.ghostnet import GhostModuleV2

    net = nn.Sequential(
        gk.GhostModule(5, 12, act_layer=nn.SiLU, backend="torch"),
        gk.GhostModule(12, 14, kernel_size=3, dw_size=5, stride=2, act_layer=nn.Hardswish, backend="torch"),
        _DeployedGhost(14, 11, nn.ReLU),
        GhostModuleV2(11, 16),   # timm's V2 is the attention variant
    )
    original = randomize(net).to(DEVICE).eval()
    for mod in original.modules():   # the deployed convs' biases and every weight: fresh random values
        if isinstance(mod, nn.Conv2d):
            with torch.no_grad():
                mod.weight.normal_(0, 0.3)
                if mod.bias is not None:
                    mod.bias.normal_(0, 0.3)
    model = gk.convert(copy.deepcopy(original), backend="triton")
    fused = [m for m in model.modules() if isinstance(m, gk.FusedGhost)]
    assert len(fused) == 4, model
    x = torch.randn(2, 5, 10, 9, device=DEVICE)
    torch._dynamo.reset()
    with torch.no_grad():
        from torch._dynamo.utils import counters
        counters.clear()
        out = torch.compile(model, backend="inductor", fullgraph=True)(x)
        assert not counters["graph_break"], dict(counters["graph_break"])
        ref, eager = copy.deepcopy(original).double()(x.double()), original(x)
    assert rel_err(out, ref) <= 2 * rel_err(eager, ref) + 1e-6


def test_channels_last_compiled_model_has_no_layout_copies():
    """A channels_last converted network under Inductor keeps channels_last through the fused ops: the
    ops' fake implementations promise eager's layout, so Inductor inserts no copy or relayout kernel
    around them (the GPU lab counts copy kernels in a profile of the compiled ghostnet_100 too)."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = randomize(gk.convert(small_ghost_net(), backend="triton")).eval().to(DEVICE, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 12, 12, device=DEVICE).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, backend="inductor", fullgraph=True), x)
        ref = model(x)
    code = "\n".join(codes)
    assert code.count("ghost_kernels.forward.default(") == 6   # backend="triton": the family chosen per call
    copies = [ln.strip() for ln in code.splitlines()
              if any(k in ln for k in ("clone(", ".copy_(", "contiguous(", "as_strided_copy")) and "import" not in ln]
    assert not copies, copies
    assert rel_err(out, ref) < 1e-5


# ---- issue 18: compile and export across input sizes ---------------------------------------------

def two_ghosts(backend):
    """Two Ghost modules, odd oup (the slice drops a ghost channel), converted to ``backend``."""
    torch.manual_seed(0)
    net = nn.Sequential(OfficialGhost(4, 8), OfficialGhost(8, 7, relu=False))
    return randomize(gk.convert(net, backend=backend)).to(DEVICE)


SIZES = [(4, 4), (6, 3), (5, 7)]   # the second size makes dynamo recompile with dynamic shapes


@pytest.mark.parametrize("backend,mode,dynamic", [
    ("triton", "eval", None), ("triton", "eval", True), ("triton", "train", None), ("triton", "train", True),
    ("auto", "eval", None), ("auto", "train", True), ("torch_folded", "eval", True)]
    + [(f, "eval", None) for f in FAMILIES])
def test_compile_across_input_sizes(backend, mode, dynamic):
    """torch.compile(fullgraph=True) of a converted model fed three input sizes: the second size used
    to crash (the choice traced a symbolic H/W into assume_constant_result) and dynamic=True failed
    on the first call. The graph must hold for every size and equal eager at each one."""
    model = getattr(two_ghosts(backend), mode)()
    twin = copy.deepcopy(model)
    c = compiled(model) if dynamic is None else torch.compile(model, backend=COMPILER, fullgraph=True, dynamic=True)
    for h, w in SIZES:
        x = torch.randn(2, 4, h, w, device=DEVICE)
        with torch.set_grad_enabled(mode == "train"):
            got, want = c(x), twin(x)
        assert rel_err(got, want) < 1e-5, (h, w)
    assert not graph_breaks(), graph_breaks()


def exported_ops(ep):
    return sorted({n.target.name() for n in ep.graph.nodes if n.op == "call_function"
                   and getattr(n.target, "namespace", None) == "ghost_kernels"})


@pytest.mark.parametrize("backend", ["triton", "auto"] + FAMILIES)
def test_export_with_dynamic_batch_height_and_width(backend):
    """torch.export with dynamic N, H and W ("you marked h as dynamic but your code specialized it"
    before): the program runs at other sizes and equals the eager module there."""
    from torch.export import Dim
    model = two_ghosts(backend).eval()
    x = torch.randn(3, 4, 7, 9, device=DEVICE)
    with torch.no_grad():
        ep = torch.export.export(model, (x,), dynamic_shapes={"input": {0: Dim("n"), 2: Dim("h"), 3: Dim("w")}})
        for shape in [(2, 4, 5, 6), (4, 4, 12, 3)]:
            x2 = torch.randn(*shape, device=DEVICE)
            assert rel_err(ep.module()(x2), model(x2)) < 1e-6, shape
    ops = exported_ops(ep)
    if backend in FAMILIES:
        assert ops == ["ghost_kernels::triton_forward"], ops
    elif backend == "triton":
        assert ops == ["ghost_kernels::forward"], ops
    # auto on a CPU runs the PyTorch path (plain aten ops); on a GPU torch_folded or the per-call op


@pytest.mark.parametrize("i,ratio,dw,stride", OP_SWEEP)
def test_forward_op_passes_opcheck(i, ratio, dw, stride):
    """The op that chooses per call (what compiled and exported graphs hold for auto / triton
    inference): schema, fake tensor (exact strides), autograd registration, AOT dispatch, over the
    option sweep, "triton" and "auto" taking turns, a 3x3 primary conv on every third point."""
    x, p = forward_point(i, ratio, dw, stride, 3 if i % 3 == 0 else 1)
    requested = ("triton", "auto")[(i // 2) % 2]
    torch.library.opcheck(torch.ops.ghost_kernels.forward.default, (x, *op_args(p.params), None, torch.float32, requested))


def test_explicit_family_checks_its_size_limits_at_run_time():
    """Under tracing a family's size-dependent limits (triton_band's maximum width) cannot be checked
    (sizes may be symbolic): the op checks them per call, with the same error eager mode gives."""
    from ghost_kernels.triton import band
    spec = gk.GhostSpec(4, 8)
    p = RandomGhost(spec, DEVICE)
    x = torch.randn(1, 4, 1, band.MAX_LANES + 1, device=DEVICE)
    args = (x, *op_args(p.params), None, torch.float32, "triton_band")
    with pytest.raises(gk.BackendNotSupported, match="backend='triton_band' cannot run this input: output 1x"):
        torch.ops.ghost_kernels.triton_forward(*args)


# ---- issue 18: eval mode with grad enabled; the documented export / compile recipes ----------------

def test_eval_with_grad_enabled_says_which_op_runs_and_the_fix():
    """An eval-mode call with grad mode on needs autograd: backend="triton" runs the training op (and
    explain() says so, and how to get the inference op); an explicit inference family raises with
    the fix in the message instead of surprising."""
    model = two_ghosts("triton").eval()
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    text = model[0].explain(x)
    assert "ghost_kernels::triton_train_forward" in text and "torch.no_grad()" in text
    with torch.no_grad():
        assert "ghost_kernels::triton_forward" in model[0].explain(x)
    model[0].backend = FAMILIES[0]
    with pytest.raises(gk.BackendNotSupported, match=r"an eval-mode call with gradients enabled.*torch\.no_grad\(\) "
                                                     r"or torch\.inference_mode\(\).*backend='triton'"):
        model(x)
    model.requires_grad_(False)     # frozen: no autograd needed, the inference op runs
    assert rel_err(model(x), two_ghosts("torch").eval()(x)) < 1e-5


@pytest.mark.parametrize("recipe", ["export_no_grad", "compile_no_grad", "compile_inference_mode"])
def test_readme_recipes_put_the_inference_op_in_the_graph(recipe):
    """The README's recipes for exporting and compiling an eval model: the inference op (not the
    training op) is what lands in the graph."""
    model = two_ghosts("triton").eval()
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    if recipe == "export_no_grad":
        with torch.no_grad():
            ep = torch.export.export(model, (x,))
        ops = exported_ops(ep)
        got = ep.module()(x)
    else:
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward
        torch._dynamo.reset()
        ctx = torch.no_grad() if recipe == "compile_no_grad" else torch.inference_mode()
        with ctx:
            got = torch.compile(model, backend=backend, fullgraph=True)(x)
        ops = sorted({n.target.name() for g in graphs for n in g.graph.nodes
                      if getattr(n.target, "namespace", None) == "ghost_kernels"})
    assert ops == ["ghost_kernels::forward"], ops
    with torch.no_grad():
        assert rel_err(got, model(x)) < 1e-6
