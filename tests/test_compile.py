"""torch.compile and torch.library: the fused eval forward is one registered op (fake implementation,
opcheck), and a converted GhostNet compiles with fullgraph=True and zero graph breaks in eval mode.
(Train mode under compile comes with the training work.)"""
import copy

import pytest
import torch
from helpers import DEVICE, GhostParams, randomize, rel_err
from test_triton_forward import LAYOUTS, make_x

import ghost_kernels as gk

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", [gk.GhostSpec(8, 13, ratio=3, dw_size=5, stride=2), gk.GhostSpec(6, 12, act="none")])
def test_triton_op_passes_opcheck(spec, layout):
    p = GhostParams(spec, DEVICE)
    x = make_x(2, spec.inp, 7, 9, torch.float32, layout)
    args = (x, *p.fold(torch.float32), spec.oup, spec.stride, spec.ratio, spec.dw_size, spec.act == "relu")
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
