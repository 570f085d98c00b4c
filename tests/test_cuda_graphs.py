"""CUDA graphs and state: the registered ops mutate nothing but the declared running statistics (every
op, eval and train mode: a CPU test in the interpreter, and on the GPU); on a GPU, the fused paths
inside CUDA graphs, torch.compile(mode="reduce-overhead") and non-default streams equal eager.

pytorch#157363: a custom op whose CUDA kernel was launched on the legacy default stream, not on
PyTorch's current stream, gave wrong results under reduce-overhead only behind a producer op (an
nn.Linear) and only for large inputs: CUDA graphs are captured and warmed up on a side stream, so the
kernel raced its producer, and small inputs finished before the race showed. So the GPU tests here put
a producer in front of the Ghost modules, use inputs larger than L2, replay with new data copied into
the static input, and compare with eager after every replay.
"""
import copy

import pytest
import torch
from helpers import (
    DEVICE,
    FAMILIES,
    RandomGhost,
    make_x,
    randomize,
    rel_err,
    small_ghost_net,
)
from torch import nn

import ghost_kernels as gk
from ghost_kernels.cuda import backend as cuda_backend
from ghost_kernels.triton.family import op_args

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="CUDA graphs, streams and L2 need a CUDA GPU")
# Every registered op and the cases below that call it: a new op without a case fails the coverage test.
OPS = ("forward", "triton_forward", "triton_train_forward", "triton_train_backward", "cuda_forward")


def registered_ops():
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("ghost_kernels::"))


def test_every_registered_op_has_a_mutation_case():
    assert set(registered_ops()) <= set(OPS), registered_ops()


def snapshot(tensors):
    """(tensor, a copy of its values, its version counter) of every tensor: an in-place write bumps the
    version even where it writes back the same values."""
    return [(t, t.detach().clone(), t._version) for t in tensors if isinstance(t, torch.Tensor)]


def changed(snap):
    return [k for k, (t, before, version) in enumerate(snap)
            if t._version != version or not torch.equal(t.detach(), before)]


def op_cases(spec, x, p):
    """(op name, label, args) for every registered op on one small input, eval and train mode."""
    args = op_args(p.params)
    cases = [("forward", backend, (x, *args, None, torch.float32, backend)) for backend in ("auto", "triton")]
    cases += [("triton_forward", fam, (x, *args, None, torch.float32, fam)) for fam in FAMILIES]
    weights = (p.w1, p.b1, p.bn1.weight, p.bn1.bias, p.wd, p.b2, p.bn2.weight, p.bn2.bias)
    tail = (1e-5, 1e-5, spec.oup, spec.stride, spec.ratio, spec.dw_size, spec.act, -1)
    running = (p.bn1.running_mean, p.bn1.running_var, p.bn2.running_mean, p.bn2.running_var)
    for mode, stats in (("train", (None,) * 4), ("eval", running)):
        fwd = (x, *weights, *stats, *tail)
        cases.append(("triton_train_forward", mode, fwd))
        out, mean1, invstd1, _, mean2, invstd2, _ = torch.ops.ghost_kernels.triton_train_forward(*fwd)
        cases.append(("triton_train_backward", mode, (torch.randn_like(out), x, *weights, mean1, invstd1, mean2,
                                                      invstd2, *tail[2:7], mode == "train", mode == "train", -1)))
    if "cuda_forward" in registered_ops():
        f = gk.fold_ghost(p.params, torch.float32)
        cases.append(("cuda_forward", "folded", (x, f.w1, f.scale1, f.shift1, f.wd, f.shift2, spec.oup, spec.stride,
                                                 spec.ratio, spec.dw_size, spec.act == "relu")))
    return cases


@pytest.mark.parametrize("size", ["small"] + (["large"] if GPU else []))
def test_ops_mutate_none_of_their_arguments(size):
    """Every registered op (each declares ``mutates_args=()``), eval- and train-mode semantics: every
    tensor argument (input, weights, BN affine, running statistics) has the same values and version
    afterwards, and no output aliases an argument. The running statistics are updated outside the
    ops (next test)."""
    spec = gk.GhostSpec(8, 12, dw_size=3)
    n, hw = (2, 5) if size == "small" else (64, 112)
    p = RandomGhost(spec, DEVICE)
    x = make_x(n, spec.inp, hw, hw, torch.float32, "channels_last")
    covered = set()
    for name, label, args in op_cases(spec, x, p):
        snap = snapshot(args)
        out = getattr(torch.ops.ghost_kernels, name)(*args)
        covered.add(name)
        assert changed(snap) == [], f"{name} ({label}) wrote into argument(s) {changed(snap)}"
        outs = out if isinstance(out, (tuple, list)) else (out,)
        inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor) and t.numel()}
        for o in outs:
            assert not o.numel() or o.untyped_storage().data_ptr() not in inputs, f"{name} ({label}) aliases an input"
    assert covered == set(registered_ops())


def _state(module):
    return dict(list(module.named_parameters()) + list(module.named_buffers()))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "torch_folded"] + FAMILIES +
                         (["cuda"] if GPU and cuda_backend.UNAVAILABLE_REASON is None else []))
def test_module_changes_only_the_running_statistics(backend):
    """A GhostModule's forward (eval mode, inference) changes no parameter, buffer or input; in train
    mode (forward and backward, on the backends that train) it changes exactly the BNs' running
    statistics and num_batches_tracked, and leaves the parameters and the input alone."""
    m = randomize(gk.GhostModule(8, 12, backend=backend)).to(DEVICE)
    x = make_x(2, 8, 5, 5, torch.float32, "channels_last")
    state = _state(m)
    names = list(state)
    snap = snapshot(list(state.values()) + [x])
    with torch.no_grad():
        m.eval()(x)
    assert changed(snap) == [], [(names + ["x"])[k] for k in changed(snap)]
    if backend not in ("auto", "torch", "triton"):
        return   # inference-only backends
    snap = snapshot(list(state.values()) + [x])
    out = m.train()(x.clone().requires_grad_())
    out.backward(torch.randn_like(out))
    moved = {(names + ["x"])[k] for k in changed(snap)}
    running = {f"{bn}.{b}" for bn in ("primary_conv.1", "cheap_operation.1")
               for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert moved == running, moved ^ running


# ---- GPU only -------------------------------------------------------------------------------------

def _l2_bytes():
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)


class Produced(nn.Module):
    """A producer kernel (a 3x3 conv over a large input) in front of a Ghost module: the op must wait
    for it, on PyTorch's current stream (pytorch#157363's nn.Linear before the custom op)."""

    def __init__(self, cin, ghost):
        super().__init__()
        self.producer = nn.Conv2d(cin, ghost.primary_conv[0].in_channels, 3, padding=1, bias=False)
        self.ghost = ghost

    def forward(self, x):
        return self.ghost(self.producer(x))


def _produced(backend, dtype=torch.bfloat16):
    ghost = randomize(gk.GhostModule(64, 96, backend=backend)).eval()
    return Produced(32, ghost).to("cuda", dtype).to(memory_format=torch.channels_last)


def _large_input(dtype=torch.bfloat16, seed=0):
    """N x 32 x 112 x 112: the producer's output (the Ghost module's input) is over twice L2."""
    n = max(8, (2 * _l2_bytes()) // (64 * 112 * 112 * 2) + 1)
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(n, 32, 112, 112, device="cuda", generator=g).to(dtype).contiguous(
        memory_format=torch.channels_last)


def _capture(fn, static):
    """A CUDA graph of ``fn(static)`` (warmed up on a side stream, as torch.cuda.graph wants), and its
    static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)
    return graph, out


def _replays_equal_eager(fn, make_input, replays=3, tol=2e-3):
    """Replay after copying new data into the static input; compare with eager on that data. The same
    kernels run both ways, so they agree to rounding; a stale input or a race is off by O(1)."""
    static = make_input(0).clone()
    graph, out = _capture(fn, static)
    for k in range(1, replays + 1):
        new = make_input(k)
        static.copy_(new)
        graph.replay()
        want = fn(new)
        torch.cuda.synchronize()
        err = rel_err(out.float(), want.float())
        assert err <= tol, f"replay {k}: rel err {err:.2e} against eager on the same input"


INFERENCE = ["auto", "torch_folded", "triton"] + FAMILIES + ["cuda"]


@needs_gpu
@pytest.mark.parametrize("backend", INFERENCE)
def test_cuda_graph_replay_behind_a_producer_equals_eager(backend):
    """Each inference backend behind a producer, captured in a CUDA graph (capture mode "global": a
    launch on the legacy default stream fails the capture) and replayed with new data over twice L2:
    every replay equals eager on the same data."""
    if backend == "cuda" and cuda_backend.UNAVAILABLE_REASON:
        pytest.skip(cuda_backend.UNAVAILABLE_REASON)
    model = _produced(backend)
    with torch.no_grad():
        _replays_equal_eager(model, _large_input)


@needs_gpu
@pytest.mark.parametrize("backend", INFERENCE)
def test_ops_run_on_the_current_stream(backend):
    """On a non-default stream with no synchronization between producer and op: a kernel launched
    on another stream would race the producer and read a partly written input."""
    if backend == "cuda" and cuda_backend.UNAVAILABLE_REASON:
        pytest.skip(cuda_backend.UNAVAILABLE_REASON)
    model = _produced(backend)
    x = _large_input()
    with torch.no_grad():
        want = model(x)
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                got = model(x)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
    assert rel_err(got.float(), want.float()) <= 2e-3


@needs_gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_converted_ghostnet_cuda_graph_replay_equals_eager(backend):
    """A converted GhostNet 1.0x (bf16 autocast, channels_last, batch 64 at 224: activations far over
    L2) captured whole in a CUDA graph; each replay with new images equals eager."""
    timm = pytest.importorskip("timm")
    model = randomize(timm.create_model("ghostnet_100", pretrained=False)).cuda().eval()
    gk.convert(model.to(memory_format=torch.channels_last), backend=backend)

    def fn(x):   # autocast's cast cache off, as CUDA graph capture wants
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return model(x)

    def images(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return torch.randn(64, 3, 224, 224, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    _replays_equal_eager(fn, images)


@needs_gpu
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_reduce_overhead_behind_a_producer_equals_eager(backend):
    """torch.compile(mode="reduce-overhead") (CUDA graph trees: warm-up and capture on a side stream) of
    a converted network behind a producer, over inputs larger than L2: every call, the warm-up, the
    recording and the replays, equals eager on its own new input."""
    net = randomize(small_ghost_net()).cuda().eval()
    gk.convert(net, backend=backend)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), net).cuda().eval()
    model = model.to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    n = max(8, (4 * _l2_bytes()) // (3 * 224 * 224 * 4) + 1)
    for k in range(5):
        g = torch.Generator(device="cuda").manual_seed(k)
        x = torch.randn(n, 3, 224, 224, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled(x).clone()
            want = eager(x)
        assert rel_err(got, want) <= 1e-4, f"call {k}: rel err {rel_err(got, want):.2e}"


@needs_gpu
def test_train_forward_in_a_cuda_graph_updates_running_stats_like_eager():
    """The fused training forward (backend="triton", train-mode BN) captured in a CUDA graph: each
    replay with new data gives eager's output and moves the running statistics exactly as eager's
    forward on the same data does; nothing else changes."""
    model = _produced("triton", torch.float32).train()
    eager = copy.deepcopy(model)
    eager.ghost.backend = "torch"
    state = _state(model.ghost)
    frozen = snapshot([t for name, t in state.items() if "running" not in name and "num_batches" not in name])

    def make(seed):
        return _large_input(torch.float32, seed)
    static = make(0).clone()
    with torch.no_grad():
        eager(static)
        eager(static)                  # as the capture's two warm-up calls do (the capture itself runs nothing)
        graph, out = _capture(model, static)
        for k in range(1, 3):
            new = make(k)
            static.copy_(new)
            graph.replay()
            want = eager(new)
            torch.cuda.synchronize()
            assert rel_err(out, want) <= 1e-4, f"replay {k}"
            for name, t in _state(eager.ghost).items():
                if "running" in name:
                    assert rel_err(state[name], t) <= 1e-4, f"replay {k}: {name}"
    assert changed(frozen) == []
