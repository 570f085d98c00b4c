"""``GhostModule``: a drop-in for the official and timm Ghost modules that runs the fused kernels.

Same constructor (either signature), same submodules, same state_dict keys: official and timm
checkpoints load with ``strict=True``. :class:`FusedGhost` is the machinery every fused module of the
package shares (the forward, the backend choice and its cache, ``explain``, TorchScript);
:class:`GhostModule` adds the official structure (``primary_conv`` / ``cheap_operation``).

The forward, in eager mode: the module's parameter bundle (``GhostParams``), validated against the
spec, and the backend chosen for this kind of input (shape, dtype, layout, train/eval, grad mode,
autocast) are cached, so a call costs a few dictionary look-ups above the kernel launch. The cache
holds references to the module's tensors, never copies, so in-place edits of any kind (``p.data``
updates, optimizer steps, EMA, ``load_state_dict``) are seen at once by the kernels, which read the
tensors on every call. It is keyed by the identity of every submodule, parameter and buffer and the
BatchNorm options, so a replaced tensor (``.to()``, ``load_state_dict(assign=True)``, a new
submodule) or changed option starts a new entry; ``train()``/``eval()``, grad mode, autocast and
``requires_grad`` are part of each call's key. Under torch.compile / torch.export nothing is cached:
the traced path is the same code without the cache.

What a call checks (issue 15: at most 15 us of the package's Python above the launch). Comparing
every object by identity costs about 4 us a call, so it runs only when something may have been
replaced: a process-wide count of registrations (``_REGISTRATIONS``, bumped by PyTorch's global
module, parameter and buffer registration hooks, which every ``setattr`` of a submodule, a
parameter or a buffer and ``load_state_dict(assign=True)`` pass through) tells a call whether any
module anywhere registered anything since its module's entry was made; ``.to()`` and its kin drop
the entry (``_apply``). The options that are plain attributes (``oup``, the BatchNorms' ``eps``,
``momentum``, ``track_running_stats``) and the conv weights' dtypes (``p.data = p.data.half()``)
are compared on every call. Not seen: editing a module's ``_parameters`` / ``_buffers`` dictionaries
directly, or ``del`` of a parameter, which bypass PyTorch's hooks: assign ``module.backend =
module.backend`` after such surgery to drop the entry.
"""
from __future__ import annotations

import operator
import warnings
import weakref
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from . import dispatch
from .core import batch_stats, reference
from .core.backend import Backend, Request, is_compiling
from .core.params import GhostParams
from .core.spec import GhostSpec
from .core.structure import official_layers, spec_from_layers, structure_problems

_UNSET = object()


def _make_act(act_layer, relu: bool) -> nn.Module:
    """The official code's ``ReLU(inplace=True)`` / empty ``Sequential()``, or timm's ``act_layer(inplace=True)``."""
    if act_layer is _UNSET:
        return nn.ReLU(inplace=True) if relu else nn.Sequential()
    if act_layer is None:
        return nn.Identity()
    try:
        return act_layer(inplace=True)
    except TypeError:  # activations without an inplace argument (nn.GELU, ...)
        return act_layer()


class _Plan(NamedTuple):
    """How calls with one input signature run: the backend (a Triton family already resolved) and
    the request's fields other than x."""

    backend: Backend
    training: bool
    needs_grad: bool
    compute_dtype: torch.dtype
    sync_group: Optional[int]
    sync_error: Optional[str]


class _State(NamedTuple):
    """What a module's calls share while its structure and tensors stay the same objects."""

    registrations: int             # _REGISTRATIONS when the fingerprint was last compared
    fingerprint: tuple             # the objects, compared by identity (FusedGhost._fingerprint)
    options: tuple                 # the plain-attribute options, compared by value (FusedGhost._options)
    params: GhostParams
    plans: Dict[tuple, _Plan]
    replays: Dict[tuple, object]   # per key: (a kernel family's LaunchPlan, out's shape and strides,
                                   # the gate's strides), or None (not replayable)


_STATES: "weakref.WeakKeyDictionary[nn.Module, _State]" = weakref.WeakKeyDictionary()
_REGISTRATIONS = 0   # registrations of a submodule, parameter or buffer by any module of the process


def _count_registration(module, name, value):
    """PyTorch's global registration hook: count, and let the registration go ahead unchanged."""
    global _REGISTRATIONS
    _REGISTRATIONS += 1


for _register_hook in (torch.nn.modules.module.register_module_module_registration_hook,
                       torch.nn.modules.module.register_module_parameter_registration_hook,
                       torch.nn.modules.module.register_module_buffer_registration_hook):
    _register_hook(_count_registration)
_NO_REPLAY = object()   # no plan made yet for a key
_MAX_PLANS = 64   # input signatures kept per module (batch sizes x resolutions x modes)


class FusedGhost(nn.Module):
    """What every fused Ghost module of the package shares: the forward through the chosen backend,
    the per-module cache, ``backend`` (validated on assignment), ``explain``, SyncBatchNorm, and
    TorchScript (which scripts the PyTorch path, leaving the module as it is).

    Subclasses provide :meth:`ghost_layers` (the six submodules: primary conv, its BatchNorm or None,
    its activation, cheap conv, its BatchNorm or None, its activation), :meth:`forward_eager` (the
    original module's forward, TorchScript-compatible), :meth:`ghost_oup` (the output channels,
    ``oup`` by default) and, for GhostNetV2's attention, :meth:`ghost_gate`."""

    __jit_unused_properties__ = ["backend", "spec", "out_chs", "gated"]   # TorchScript does not compile them

    # -- subclass interface -----------------------------------------------------------------------
    def ghost_layers(self) -> Tuple[nn.Module, nn.Module, nn.Module, nn.Module, nn.Module, nn.Module]:
        raise NotImplementedError

    def forward_eager(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def ghost_oup(self) -> int:
        """Output channels (the slice of the concatenation)."""
        return self.oup

    def ghost_gate(self, x: Tensor) -> Optional[Tensor]:
        """GhostNetV2's attention for input ``x`` (through its sigmoid, at its own resolution), or None."""
        return None

    @property
    def gated(self) -> bool:
        """Whether :meth:`ghost_gate` gives a gate (GhostNetV2's attention)."""
        return False

    def _gate_requires_grad(self) -> bool:
        """Whether autograd would differentiate the gate (a parameter of its branch requires grad)."""
        return False

    def ghost_spec(self) -> GhostSpec:
        return spec_from_layers(self.ghost_layers(), self.ghost_oup())

    # -- backend --------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"auto"`` or a name of :func:`ghost_kernels.available_backends`; checked on assignment."""
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, value: str) -> None:
        self.__dict__["_backend"] = dispatch.check_backend_name(value, "backend")
        _STATES.pop(self, None)

    @property
    def spec(self) -> GhostSpec:
        return self.ghost_spec()

    def params(self) -> GhostParams:
        """This module's parameters and buffers (shared, not copied) as one bundle."""
        return GhostParams.from_module(self, self.ghost_spec())

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self.forward_eager(x)
        return self._forward_dispatch(x)

    @torch.jit.unused
    def _forward_dispatch(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():   # TorchScript records the PyTorch path
            _warn_torchscript()
            return self.forward_eager(x)
        if is_compiling():           # traced once: the plain path, no cache
            req = self._request(x)
            backend = dispatch.choose(self.backend, req).backend
            return self.forward_eager(x) if backend is reference.BACKEND else backend.forward(x, req)
        state = _STATES.get(self)
        if state is None or state.registrations != _REGISTRATIONS or state.options != self._options(state.fingerprint):
            state = self._state()
        if not isinstance(x, Tensor):
            dispatch.validate_input(x, state.params)   # the clear TypeError
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or _any_requires_grad(state.params)
                                                  or self._gate_requires_grad())
        device = x.device
        dtype = _autocast_dtype(device.type) or x.dtype
        training = self.training
        key = (x.shape, x.stride(), x.data_ptr() % 16, x.dtype, device, training, needs_grad, dtype)
        plan = state.plans.get(key)
        if training:   # the process group can change between calls (SyncBatchNorm conversion, sync_batch_stats)
            sync = self._sync()
            if plan is not None and (plan.sync_group, plan.sync_error) != sync:
                plan = None
        else:
            sync = (None, None)
        if plan is None:
            plan = self._plan(x, state, key, sync)
        if plan.backend is reference.BACKEND:
            return self.forward_eager(x)
        gate = self.ghost_gate(x) if self.gated else None
        replay = state.replays.get(key, _NO_REPLAY)
        if replay is not None and replay is not _NO_REPLAY and (gate is None or gate.stride() == replay[3]):
            launches, shape, strides, _ = replay
            out = torch.empty_strided(shape, strides, dtype=dtype, device=device)
            launches.run(x, out, gate)
            return out
        req = Request(x, state.params, plan.training, plan.needs_grad, plan.compute_dtype, plan.sync_group,
                      plan.sync_error, gate)
        if replay is _NO_REPLAY and plan.training is False and not plan.needs_grad:
            out, launches = plan.backend.launch_and_plan(x, req)
            state.replays[key] = None if launches is None else (
                launches, out.shape, out.stride(), None if gate is None else gate.stride())
            return out
        return plan.backend.forward(x, req)

    def _plan(self, x: Tensor, state: _State, key: tuple, sync) -> _Plan:
        """Validate x, choose the backend (raising as ``dispatch.choose`` does) and remember it."""
        dispatch.validate_input(x, state.params)
        req = Request.make(x, state.params, self.training, *sync, gate=self.ghost_gate(x) if self.gated else None)
        backend = dispatch.choose(self.backend, req).backend.resolve(req)
        plan = _Plan(backend, req.training, req.needs_grad, req.compute_dtype, req.sync_group, req.sync_error)
        if len(state.plans) >= _MAX_PLANS:
            state.plans.clear()
            state.replays.clear()
        state.plans[key] = plan
        return plan

    def _state(self) -> _State:
        """The cached bundle, valid while every submodule, parameter and buffer is the same object and
        the options are unchanged (see the module docstring). The identity comparison runs here, on
        a call after any registration in the process or an option change, not on every call."""
        fingerprint = self._fingerprint()
        options = self._options(fingerprint)
        state = _STATES.get(self)
        if state is None or len(state.fingerprint) != len(fingerprint) or state.options != options \
                or not all(map(operator.is_, state.fingerprint, fingerprint)):
            state = _State(_REGISTRATIONS, fingerprint, options, self.params().check(), {}, {})
        else:
            state = state._replace(registrations=_REGISTRATIONS)
        _STATES[self] = state
        return state

    def _fingerprint(self) -> tuple:
        """The objects the cached bundle depends on, compared by identity (a reassigned attribute or
        tensor is a different object, even when equal): the six submodules, the convs' and
        BatchNorms' tensors (activations with tensors run on PyTorch anyway)."""
        conv1, bn1, act1, conv2, bn2, act2 = self.ghost_layers()
        out = [conv1, bn1, act1, conv2, bn2, act2, *conv1._parameters.values(), *conv2._parameters.values()]
        for bn in (bn1, bn2):
            if bn is not None:
                out += (*bn._parameters.values(), *bn._buffers.values())
        return tuple(out)

    def _options(self, fingerprint: tuple) -> tuple:
        """The options that are plain attributes, compared by value on every call: the output
        channels, the conv weights' dtypes (``p.data = p.data.half()`` keeps the object) and the
        BatchNorms' ``eps``, ``momentum`` and ``track_running_stats``. ``fingerprint``'s submodules
        are the module's own as long as no registration happened (see the module docstring)."""
        conv1, bn1, _, conv2, bn2, _ = fingerprint[:6]
        return (self.ghost_oup(), conv1._parameters["weight"].dtype, conv2._parameters["weight"].dtype,
                None if bn1 is None else (bn1.eps, bn1.momentum, bn1.track_running_stats),
                None if bn2 is None else (bn2.eps, bn2.momentum, bn2.track_running_stats))

    def _apply(self, fn, *args, **kwargs):
        _STATES.pop(self, None)   # .to(), .half(), .cuda(): tensors may change in place (param.data)
        return super()._apply(fn, *args, **kwargs)

    def _request(self, x: Tensor) -> Request:
        """The full, uncached request (explain, and the traced path)."""
        params = self.params()
        dispatch.validate_input(x, params)
        return Request.make(x, params, self.training, *self._sync(), gate=self.ghost_gate(x) if self.gated else None)

    def explain(self, x: Tensor) -> str:
        """Which backend runs ``x`` now (given train/eval mode and grad mode), the measurement behind
        the choice, why the others don't, and what a compiled or exported graph would hold."""
        return dispatch.explain(self.backend, self._request(x))

    # -- synchronized batch statistics ---------------------------------------------------------------
    def sync_batch_stats(self, process_group=None, enabled: bool = True) -> "FusedGhost":
        """Synchronize the train-mode batch statistics of both BatchNorms over ``process_group``
        (default: the whole world), as ``nn.SyncBatchNorm`` would, while they stay ``nn.BatchNorm2d``
        (DistributedDataParallel accepts those on any device; SyncBatchNorm it accepts on GPUs only).
        ``nn.SyncBatchNorm.convert_sync_batchnorm`` on a converted model works too."""
        self._sync_stats, self._sync_group = enabled, process_group
        return self

    def _sync(self) -> Tuple[Optional[int], Optional[str]]:
        """(process group index, None) when train-mode batch statistics are synchronized over more than
        one rank (SyncBatchNorm or :meth:`sync_batch_stats`), (None, why not) when they cannot be
        (only one BN is a SyncBatchNorm), else (None, None)."""
        if not self.training:
            return None, None
        layers = self.ghost_layers()
        bn1, bn2 = layers[1], layers[4]
        if bn1 is None and bn2 is None:
            return None, None
        synced = isinstance(bn1, nn.SyncBatchNorm), isinstance(bn2, nn.SyncBatchNorm)
        if getattr(self, "_sync_stats", False):
            group = self._sync_group
        elif any(synced):
            if not all(synced) or bn1.process_group is not bn2.process_group:
                return None, "one BatchNorm is a SyncBatchNorm and the other is not (or another group)"
            group = bn1.process_group
        else:
            return None, None
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return None, None
        return batch_stats.register_group(group), None

    # -- TorchScript ----------------------------------------------------------------------------------
    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles :meth:`forward`, whose scripted branch is the original module's
        forward (the PyTorch path): TorchScript cannot call the fused kernels. The module itself is
        left as it is (the scripted module shares its parameters). For the fused kernels in a
        compiled or exported graph use ``torch.compile`` or ``torch.export``."""
        _warn_torchscript()
        return self


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype for ``device_type`` where torch.autocast is on, else None (the hot path's
    ``core.backend.compute_dtype``)."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None



def _any_requires_grad(params: GhostParams) -> bool:
    return any(t is not None and t.requires_grad for t in params.trainable())


class GhostModule(FusedGhost):
    """Ghost module (GhostNet, arXiv 1911.11907) with fused GPU kernels.

    Constructed like the official module, ``GhostModule(inp, oup, kernel_size=1, ratio=2, dw_size=3,
    stride=1, relu=True)``, or like timm's, ``GhostModule(in_chs, out_chs, kernel_size=1, ratio=2,
    dw_size=3, stride=1, act_layer=nn.ReLU, device=None, dtype=None)`` (not both: conflicting
    arguments raise). Extra keyword: ``backend``, ``"auto"`` (default) or any name of
    :func:`ghost_kernels.available_backends`.

    Equivalent PyTorch (this is exactly what ``backend="torch"`` runs, so SyncBatchNorm from
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, forward hooks and custom activations behave as in
    the original)::

        x1 = self.primary_conv(x)           # Conv2d(inp, m, k, stride, k//2) -> BN -> act
        x2 = self.cheap_operation(x1)       # Conv2d(m, m*(ratio-1), d, 1, d//2, groups=m) -> BN -> act
        return torch.cat([x1, x2], 1)[:, :oup]

    In eval mode under ``torch.no_grad()``/``torch.inference_mode()`` the chosen inference backend
    runs with BN folded from the current parameters and buffers on every call. In train mode, or
    whenever gradients are needed (eval mode with grad mode on included), the triton backend runs the
    training ops (``triton/train_ops.py``): batch statistics and running-statistics updates exactly as
    ``nn.BatchNorm2d``, a fused backward, and, after ``nn.SyncBatchNorm.convert_sync_batchnorm``,
    batch statistics synchronized over the SyncBatchNorm's process group. ``explain(x)`` says which
    backend runs ``x`` and why.
    """

    def __init__(self, inp: Optional[int] = None, oup: Optional[int] = None, kernel_size: int = 1,
                 ratio: int = 2, dw_size: int = 3, stride: int = 1, relu=_UNSET, *,
                 act_layer=_UNSET, device=None, dtype=None, backend: str = "auto",
                 in_chs: Optional[int] = None, out_chs: Optional[int] = None):
        super().__init__()
        inp = _one_of("inp", inp, "in_chs", in_chs)
        oup = _one_of("oup", oup, "out_chs", out_chs)
        if inp is None or oup is None:
            raise TypeError("GhostModule needs inp (in_chs) and oup (out_chs)")
        if relu is not _UNSET and not isinstance(relu, bool):  # timm passes act_layer as the 7th positional
            if act_layer is not _UNSET:
                raise TypeError("GhostModule: act_layer given twice (7th positional argument and keyword)")
            act_layer, relu = relu, _UNSET
        if relu is not _UNSET and act_layer is not _UNSET:
            raise TypeError(f"GhostModule: give relu (official signature) or act_layer (timm's), not both: "
                            f"got relu={relu!r} and act_layer={act_layer!r}")
        relu = True if relu is _UNSET else relu
        dd = {"device": device, "dtype": dtype}
        spec = GhostSpec(inp, oup, kernel_size, ratio, dw_size, stride)  # validates the arguments
        self.oup = oup
        self.backend = backend
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, spec.m, kernel_size, stride, kernel_size // 2, bias=False, **dd),
            nn.BatchNorm2d(spec.m, **dd),
            _make_act(act_layer, relu),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(spec.m, spec.new, dw_size, 1, dw_size // 2, groups=spec.m, bias=False, **dd),
            nn.BatchNorm2d(spec.new, **dd),
            _make_act(act_layer, relu),
        )

    @property
    def out_chs(self) -> int:
        """timm's name for ``oup``."""
        return self.oup

    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> "GhostModule":
        """A GhostModule that shares ``module``'s submodules (weights, buffers, train/eval mode)."""
        problems = structure_problems(module)
        if problems:
            raise ValueError(f"{type(module).__name__} is not a convertible Ghost module: " + "; ".join(problems))
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.oup = getattr(module, "oup", getattr(module, "out_chs", None))
        new.backend = backend
        new.primary_conv = module.primary_conv
        new.cheap_operation = module.cheap_operation
        new.train(module.training)
        return new

    def ghost_layers(self):
        pc, co = self._modules["primary_conv"]._modules, self._modules["cheap_operation"]._modules
        if len(pc) == 3 and len(co) == 3:
            return pc["0"], pc["1"], pc["2"], co["0"], co["1"], co["2"]
        return (*official_layers(self.primary_conv), *official_layers(self.cheap_operation))

    def forward_eager(self, x: Tensor) -> Tensor:
        """The "torch" backend: the official module's forward, through the submodules themselves."""
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return torch.cat([x1, x2], dim=1)[:, : self.oup]

    def extra_repr(self) -> str:
        return f"oup={self.oup}, backend={self.backend!r}"


def _one_of(name: str, value, alias: str, alias_value):
    """The official argument or timm's name for it; both given and different is an error."""
    if value is not None and alias_value is not None and value != alias_value:
        raise TypeError(f"GhostModule: {name}={value} and {alias}={alias_value} conflict (they are the same "
                        f"argument in the official and timm signatures; give one)")
    return alias_value if value is None else value


_TORCHSCRIPT_WARNED = False


def _warn_torchscript() -> None:
    global _TORCHSCRIPT_WARNED
    if not _TORCHSCRIPT_WARNED:
        _TORCHSCRIPT_WARNED = True
        warnings.warn("ghost_kernels: TorchScript (torch.jit.script / torch.jit.trace) runs the Ghost modules' "
                      "PyTorch path, not the fused kernels; use torch.compile or torch.export for those",
                      stacklevel=3)
