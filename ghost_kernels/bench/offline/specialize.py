"""Specialization: what Triton's JIT would compile for one recorded launch on an H100/H200 (sm_90),
as a :class:`CompileJob` -- through the JIT's own binder with the sm_90 backend, or through
``kernel.run(warmup=True)`` with a stand-in sm_90 driver when those internals move -- and finding
the kernel of a job again in a compile worker."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections import defaultdict
from typing import Any, Dict

from .errors import OfflineError, TritonApiMismatch

TARGET_ARCH = 90


def _triton():
    try:
        import triton  # noqa: F401
        return triton
    except Exception as exc:  # pragma: no cover
        raise OfflineError(f"triton is not importable: {exc!r}") from exc


def _jit_class():
    from triton.runtime.jit import JITFunction
    return JITFunction


def target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", TARGET_ARCH, 32)


_BACKEND = None


def _backend():
    global _BACKEND
    if _BACKEND is None:
        try:
            from triton.compiler import make_backend
        except ImportError as exc:
            raise TritonApiMismatch(f"Triton {_triton().__version__}: no triton.compiler.make_backend ({exc})") from exc
        _BACKEND = make_backend(target())
    return _BACKEND


_BINDERS: Dict[int, Any] = {}


def _binder(kernel):
    """The argument binder Triton's JIT builds for ``kernel.run`` (``JITFunction.create_binder``),
    for the sm_90 backend instead of the active driver's."""
    b = _BINDERS.get(id(kernel))
    if b is None:
        try:
            from triton.runtime.jit import create_function_from_signature
            b = create_function_from_signature(kernel.signature, kernel.params, _backend())
        except (ImportError, AttributeError, TypeError) as exc:
            raise TritonApiMismatch(f"Triton {_triton().__version__}: cannot build the JIT's binder offline "
                                    f"(create_function_from_signature: {exc!r})") from exc
        _BINDERS[id(kernel)] = b
    return b


def kernel_ref(kernel) -> dict:
    fn = kernel.fn
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        path = None
    return dict(module=fn.__module__, qualname=fn.__qualname__, file=path)


def _encode_const(v):
    J = _jit_class()
    if isinstance(v, J):
        return {"__jit__": kernel_ref(v)}
    return v


def _decode_const(v):
    if isinstance(v, dict) and "__jit__" in v:
        return resolve_kernel(v["__jit__"])
    return v


@dataclasses.dataclass
class CompileJob:
    key: str
    kernel: dict                 # kernel_ref
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    specialization: str          # human-readable (the binder's output)
    source_key: str = ""         # the kernel's cache_key (source + dependencies) when captured


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def _make_job(kernel, signature: dict, constexprs: dict, attrs: dict, opts: dict, spec_txt: str) -> CompileJob:
    ref = kernel_ref(kernel)
    canon = lambda d: sorted((str(_tuplify(k)), repr(_tuplify(v))) for k, v in d.items())  # noqa: E731
    opts = {k: _tuplify(v) for k, v in opts.items()}
    key_src = json.dumps([ref["module"], ref["qualname"], kernel.cache_key, sorted(signature.items()),
                          canon(constexprs), canon(attrs), canon(opts)], default=str)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    return CompileJob(key, ref, kernel.__name__, dict(signature), {k: _encode_const(v) for k, v in constexprs.items()},
                      dict(attrs), opts, spec_txt, kernel.cache_key)


def specialize_launch(launch, method: str = "auto") -> CompileJob:
    """Triton's specialization of one recorded launch for sm_90.

    ``method="binder"``: ``JITFunction.run``'s own steps (the binder that ``create_binder`` builds,
    then ``_pack_args``) with the sm_90 backend, without a driver. ``method="run"``:
    ``kernel.run(..., warmup=True)`` itself with a stand-in driver whose target is sm_90, stopped
    by ``knobs.runtime.jit_cache_hook`` before it compiles. ``"auto"``: the binder, and the run path
    if this Triton's internals differ; :class:`TritonApiMismatch` if neither works."""
    kernel = launch.kernel
    J = _jit_class()
    if not isinstance(kernel, J):
        raise OfflineError(f"{getattr(kernel, '__name__', kernel)!r} is not a triton JITFunction (is "
                           "TRITON_INTERPRET=1 set in this process? the offline model compiles without it)")
    if method == "run":
        return _specialize_via_run(launch)
    try:
        return _specialize_via_binder(launch)
    except TritonApiMismatch as exc:
        if method == "binder":
            raise
        try:
            return _specialize_via_run(launch)
        except TritonApiMismatch as exc2:
            raise TritonApiMismatch(f"{exc}; and through JITFunction.run: {exc2}") from exc2


def _run_kwargs(kernel, kwargs: dict) -> dict:
    """The options ``JITFunction.run`` adds to a launch's keyword arguments."""
    kwargs = dict(kwargs)
    try:
        from triton import knobs
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
        if hasattr(knobs.compilation, "instrumentation_mode"):
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    except ImportError:  # pragma: no cover - Triton < 3.4
        kwargs.setdefault("debug", kernel.debug)
    return kwargs


def _specialize_via_binder(launch) -> CompileJob:
    kernel = launch.kernel
    kwargs = _run_kwargs(kernel, launch.kwargs)
    backend = _backend()
    try:
        bound_args, specialization, options = _binder(kernel)(*launch.args, **kwargs)
        options_obj, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization,
                                                                       options)
    except (AttributeError, TypeError, ValueError) as exc:
        if isinstance(exc, TypeError) and "argument" in str(exc) and "dynamic_func" in str(exc):
            raise OfflineError(f"{kernel.__name__}: the launch's arguments do not fit the kernel: {exc}") from exc
        raise TritonApiMismatch(f"Triton {_triton().__version__}: the JIT's specialization API differs "
                                f"({type(exc).__name__}: {exc})") from exc
    return _make_job(kernel, signature, constexprs, attrs, dict(options_obj.__dict__), repr(specialization))


class _Sm90Driver:
    """Just what ``JITFunction.run(warmup=True)`` asks of the active driver."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return target()


def _specialize_via_run(launch) -> CompileJob:
    kernel = launch.kernel
    try:
        from triton import knobs
        from triton.runtime.driver import driver
        prev_hook = knobs.runtime.jit_cache_hook
        prev_active = driver._active
        prev_caches = kernel.device_caches
    except (ImportError, AttributeError) as exc:
        raise TritonApiMismatch(f"Triton {_triton().__version__}: no jit_cache_hook / driver._active / "
                                f"device_caches ({exc})") from exc
    seen: Dict[str, Any] = {}

    def hook(**kw):
        seen.update(kw.get("compile", {}))
        return True  # do not compile

    driver.set_active(_Sm90Driver())
    knobs.runtime.jit_cache_hook = hook
    kernel.device_caches = defaultdict(kernel.create_binder)
    try:
        kernel.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
    except TypeError as exc:
        raise OfflineError(f"{kernel.__name__}: the launch's arguments do not fit the kernel: {exc}") from exc
    finally:
        knobs.runtime.jit_cache_hook = prev_hook
        driver._active = prev_active
        kernel.device_caches = prev_caches
    try:
        data = json.loads(seen["specialization_data"])
        opts = data["options"]
        return _make_job(kernel, seen["signature"], seen["constants"], seen["configs"][0], opts,
                         repr(list(zip(seen["signature"].values(), data.get("attrs_vals", [])))))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise TritonApiMismatch(f"Triton {_triton().__version__}: JITFunction.run's compile hook gave "
                                f"{sorted(seen)} ({exc!r})") from exc


_KERNELS: Dict[tuple, Any] = {}


def resolve_kernel(ref: dict):
    """The JITFunction of ``ref`` (module + qualname; else loaded from its file) in this process."""
    k = (ref["module"], ref["qualname"], ref.get("file"))
    if k in _KERNELS:
        return _KERNELS[k]
    J = _jit_class()
    obj = None
    mod = sys.modules.get(ref["module"])
    if mod is None and ref["module"] not in ("__main__", "__mp_main__"):
        try:
            mod = importlib.import_module(ref["module"])
        except Exception:
            mod = None
    candidates = [mod] if mod is not None else []
    if ref.get("file"):
        candidates.append(None)
    for m in candidates:
        if m is None:
            m = load_module_file(ref["file"])
        obj = m
        for part in ref["qualname"].split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, J):
            break
        obj = None
    if obj is None:
        raise OfflineError(f"cannot find the Triton kernel {ref['module']}.{ref['qualname']} ({ref.get('file')}) "
                           "in the compile worker")
    _KERNELS[k] = obj
    return obj


IMPORTED_PREFIX = "_gk_offline_"   # module names of the files loaded by --import (``imports=``)


def load_module_file(path: str):
    """Import a Python file as a module (once; its name, from the path, starts with IMPORTED_PREFIX)."""
    path = os.path.abspath(path)
    name = IMPORTED_PREFIX + hashlib.sha1(path.encode()).hexdigest()[:10]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
