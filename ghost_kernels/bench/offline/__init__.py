"""Offline performance model: what each kernel family's real launches compile to on sm_90, how many
warp-instructions a call issues per HBM byte, and how long its programs wait on memory -- without a
GPU.

``python -m ghost_kernels.bench.offline --out DIR [--families a,b] [--dtypes ...] [--layouts ...]
[--shapes all|quick|i,j|module names] [--batch 256]`` writes ``DIR/offline.json`` and ``DIR/offline.md``.
From Python: :func:`model_rows` (the rows) or :func:`model` (rows and meta).

How a row is made
=================

1. **Capture.** The family's real launcher runs on CPU tensors of the real shapes (``torch.empty`` of
   batch 256 costs no memory until touched; strides, views and 16-byte alignment are as on the GPU)
   inside :func:`ghost_kernels.triton.common.capture_launches`, which records every launch (kernel,
   grid, arguments, constexprs, ``num_warps``/``num_stages``, and ``loops``: the average trip count
   of each runtime loop, in source order) instead of running it.
2. **Specialize.** Each launch goes through Triton's own binder -- the function its JIT builds with
   ``create_function_from_signature`` for ``kernel.run`` -- with the CUDA backend of
   ``GPUTarget("cuda", 90, 32)``, then ``JITFunction._pack_args``: pointer alignment to 16 bytes,
   integers equal to 1 or divisible by 16 (except ``do_not_specialize``), tensor dtypes, constexprs
   and compile options come out exactly as for a launch on an H100/H200 (see
   :func:`specialize_launch`). Should those internals move, the fallback runs ``kernel.run(...,
   warmup=True)`` itself with a stand-in driver whose target is sm_90 and stops it in
   ``knobs.runtime.jit_cache_hook`` before it compiles (the tests hold both paths equal); if neither
   works, :class:`TritonApiMismatch` says so. The ``(kernel source, specialization, options)`` triple
   is the compile key; equal keys compile once per run. Tested with Triton 3.6 (the GPU machine's:
   ``pip install --no-deps --target /tmp/triton36 triton==3.6.0`` and ``PYTHONPATH=/tmp/triton36``)
   and 3.8.
3. **Compile** for sm_90 with ``triton.compile`` in a process pool of at most 2 workers, never under
   ``TRITON_INTERPRET=1`` (a process that has the interpreter on runs the whole model in a child
   process without it).
4. **Read the cubin.** ``nvdisasm -c -gi -hex`` (SASS with inlined source lines and each
   instruction's encoding, whose control bits the latency term reads), ``cuobjdump -res-usage``
   (registers), ptxas's own ``-v`` log when the compile ran (spill stores; from a Triton cache hit the
   spill bytes are the local stores, ``STL``, in the SASS), ``metadata.shared`` (shared memory),
   TTIR/TTGIR (source loops, software pipelining).

The instruction model
=====================

* The SASS is split into basic blocks; blocks not reachable from the entry (the ``BRA self`` trap
  and NOP padding after the last ``EXIT``) count nothing. A **loop** is the natural loop of each
  back edge: a branch whose target address is not above it *and* whose target dominates it (back
  edges to one header are one loop); loops nest by containment. A backward branch whose target does
  not dominate it is the jump back of an out-of-line block (ptxas puts the retry path of an mbarrier
  wait after the last ``EXIT`` and jumps back behind the wait): no loop, its block counts as code of
  the loops around the wait. Every reachable instruction is weighted by the product of the
  trip counts of the loops that contain it, and the per-program sum is multiplied by ``num_warps``
  and by the number of programs (product of the grid).
* **Hardware wait/retry loops** are no source loops. A TMA load (tensor descriptor) or any
  ``ttng.wait_barrier`` waits on an mbarrier: ``SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [bar]`` then
  ``@!P0 BRA`` to an out-of-line stub that retries the same ``TRYWAIT`` in a loop of its own until the
  phase flips. A SASS loop with no loop inside, of at most ``sass.WAIT_LOOP_MAX`` instructions,
  containing a wait instruction (``SYNCS`` with ``PHASECHK``/``TRYWAIT``/``TEST_WAIT``, or ``NANOSLEEP``)
  and otherwise only branches, integer/predicate arithmetic or memory polls (``sass.WAIT_LOOP_ALLOWED``)
  is such a **wait loop**: it takes no ``loops=`` entry and is not matched to a source loop. *Assumed:*
  it executes once per entry (weight 1: the wait succeeds on the first retry; ``TRYWAIT`` suspends the
  warp for a while before it fails, so the retries a long wait issues are few, and they are issue slots
  of an idle warp), and the out-of-line stub around it is counted once per entry of its enclosing
  loop even when the in-line wait succeeded (a few instructions per wait, an overestimate). In
  ``sass_loops`` they have ``wait: true`` and ``trips`` "hardware wait/retry loop: once per entry".
* **Matching trip counts to SASS loops.** The source loops are the ``scf.for`` ops of the TTGIR
  (what Triton hands to LLVM; ``tl.static_range`` copies are separate loops), in source order, each
  with its source line. Each SASS loop carries the (innermost, inlined) source line of its back-edge
  branch; a source loop takes the SASS loops of its line in address order. A source loop with no
  SASS loop was unrolled away (its body is straight-line code, counted as such; its trip count is
  not used); a source loop with several sibling SASS loops was unrolled by ptxas (a U-times body
  plus a remainder loop; see below). ``loops`` then matches, in order, either every source loop,
  or only those that survive as SASS loops, or (without line information) the SASS loops by start
  address and nesting. Anything else raises :class:`LoopMismatch` with a table of the source and
  SASS loops. The ``sass_loops`` of each launch in the JSON say which trip count went where.
* **Software pipelining.** Triton 3.6-3.8 (sm_90) pipeline a loop without peeling its epilogue: the
  prologue (the first ``num_stages - 1`` stages' loads) is straight-line code before the loop, the
  loop keeps its full trip count and predicates off the loads past the end (checked on the TTGIR:
  the pipelined ``scf.for`` keeps its bounds). So a pipelined loop is weighted by ``trips``. Where
  the TTGIR loop's upper bound differs from the TTIR one (a peeled epilogue), the steady state is
  weighted by ``trips - (num_stages - 1)`` (at least 0) and the peeled copies count as
  straight-line code.
* **ptxas unrolling.** A loop that ptxas unrolls by U (a small body with a known step) becomes a
  U-times loop plus a remainder loop, sometimes with peeled straight-line copies. U is estimated
  from the bodies (instructions not on the loop's own source line: a U-times body has U times the
  payload of the remainder). The U-times loop gets ``(T - r) / U`` trips, the remainder loops share
  ``r = min(T, (U - 1) / 2)``; peeled straight-line copies are counted once per entry (an
  overestimate of at most about U bodies per entry).

Known error sources (the model counts *issued* warp-instructions of the static code, so it is an
estimate of ``smsp__inst_executed.sum``):

* predicated-off instructions are counted (as the hardware counts them: ncu's ``inst_executed``
  includes them); ``if``/``else`` branches that are *not* loops are both counted once per entry
  (both sides of a warp-uniform branch: overestimate by the side not taken; a branch taken by
  only some programs, e.g. a tail tile, also counts fully);
* branch divergence is ignored (a divergent branch issues both sides: the model is exact for it);
  early exits (``@P EXIT`` for programs past the end) count as if not taken;
* trip counts are averages given by the launcher; a loop whose trip count varies between programs
  contributes ``average x body``; the grid of a persistent launch is sized on the CPU (the
  launcher's non-CUDA path), which changes only per-program set-up code;
* ``CALL``ed (non-inlined) functions are not followed; ``BRX`` (indirect branches) are taken as
  falling through;
* the ptxas-unrolled loops' remainder split above, and spill bytes from ``STL`` when ptxas's log
  is not available (a Triton cache hit);
* hardware wait loops count once per entry (above): the time a warp spends waiting for a TMA
  load or a barrier is not issue time (the latency term charges it, below);
* ``instr_per_byte`` divides by the *floor* (x read once, output written once), not by the bytes
  the kernel really moves (``hbm_bytes`` adds the family's declared extra traffic);
* ``predicted_us`` is the largest of three terms built on *assumed* rates and latencies
  (``rows.ISSUE_RATE``, ``rows.HBM_RATE``, ``latency.MEMORY_LATENCY_US``, ``latency.L2_LATENCY_US``):
  no tail effect (beyond whole rounds) or launch overhead; to be checked against the GPU lab.

The latency term
================

``latency.py`` (its docstring has the details and assumptions): resident programs per SM from
registers, shared memory and warps; one warp walks its program's SASS as the hardware issues it --
stall counts and scoreboard waits from the instructions' control bits (``nvdisasm -hex``), each global
load taking a loaded DRAM latency (0.6 us; 0.3 us for loads from tensors of at most 4 MiB, which
stay in L2: weights, per-program scratch), ``cp.async``/TMA/wgmma groups waited for where the SASS
waits; ``latency_us = rounds x`` that path. A kernel that prefetches hides the latency behind the
work in between; one that loads, waits and only then loads again pays it every time. Checked
against the v1 kernel's H200 measurements (NOTES.md, 2026-12-02).

Checking it on a GPU: run the same shape with Nsight Compute, e.g.
``ncu --metrics smsp__inst_executed.sum,launch__registers_per_thread,launch__grid_size
--kernel-name regex:<kernel> python -m ghost_kernels.bench --shapes <i> --impls <family> --batch 256``
and compare ``smsp__inst_executed.sum`` (summed over the launches of one call) with the row's
``warp_instr`` (per launch: ``launches[i].warp_instr``); ``launch__registers_per_thread`` with
``regs``. The persistent grid differs on the GPU (resident programs x SMs): compare per call, not per
program. A match within ~5-10% confirms the trip counts; a larger gap points at a mis-stated
``loops`` entry (see ``sass_loops``) or at branches the model counts both sides of.

The rows (``offline.json``: ``{"meta": ..., "rows": [...]}``)
===========================================================

One row per (family, shape, dtype, layout), x and weights in ``dtype`` (the bench's
``module.to(dtype)``): ``family, name, inp, oup, h, w, ho, wo, ratio, dw_size, stride, act, dtype,
layout, batch``; over the call's launches: ``regs`` (max), ``spills`` (max spill-store bytes),
``smem`` (max, bytes), ``ld_bits``/``st_bits`` (the widest global load/store of each launch, the
narrowest of those over the launches; ``LDGSTS`` cp.async counts as a load, TMA as 128),
``ld_bits_main``/``st_bits_main`` (the width that moves the most bytes in the modelled count: a
kernel whose x loads are 2-byte but whose weight loads are 16-byte has ``ld_bits`` 128 and
``ld_bits_main`` 16; a TMA load counts as one 128-bit access per thread, far less than the box it
moves, so a kernel that loads x by TMA shows the width of its other loads, e.g. weights; ``tma_loads``
counts the ``UTMALDG`` instructions in the static code, to say so),
``barriers`` (``BAR`` instructions in the static code, summed), ``barriers_per_tile`` (modelled
``BAR`` per tile, max over launches; a tile is one iteration of a
persistent kernel's outermost loop when that loop issues most of the instructions, else one
program), ``mma`` (static tensor-core instructions), ``warp_instr`` (modelled, summed),
``floor_bytes``, ``instr_per_byte`` (the instruction budget is **0.25** warp-instructions per floor
byte, ``choice.INSTRUCTION_BUDGET``, enforced by ``tests/test_offline_budget.py``), ``floor_us`` (the
floor at 4223 GB/s, an H200's copy bandwidth), ``hbm_bytes`` (``floor_bytes`` plus the family's
``TritonFamily.extra_hbm_bytes(spec, n, h, w, elem_bytes, channels_last)``, 0 when the family
defines none; e.g. ``triton_two_pass`` reads y1 back), the three terms ``issue_us`` (``warp_instr /
ISSUE_RATE``: 132 SMs x 4 issue slots x 0.7 sustained x 1.98 GHz = 732 G warp-instructions/s),
``hbm_us`` (``hbm_bytes / HBM_RATE``: 0.85 x 4.22 TB/s, the copy bandwidth measured on an H200 on
2026-11-28, ``benchmarks/results/2026-11-28-nvidia-h200-quick.json``) and ``latency_us`` (the
launches' latency terms summed; None without control bits), ``predicted_us`` = the largest of the
three, and the latency facts of the slowest launch: ``ctas_per_sm``, ``rounds``, ``round_trips``
(dependent DRAM round trips of the call's critical path) and ``bytes_in_flight_per_sm`` (HBM bytes
per SM per round trip; the HBM term needs ``rows.BYTES_NEEDED_IN_FLIGHT``, about 16 KB); the
rates and latencies are assumptions, kept in ``rows.py`` and ``latency.py``, to be checked against
the GPU lab; ``chosen`` (the family
``choice.triton_family`` picks on an H200), ``variants`` (distinct compiled kernels of the call),
``error`` (why a row has no numbers),
and ``launches``: per launch the same facts plus grid, ``num_warps``, ``num_stages``, ``loops``,
the specialization, width histograms (static and modelled), modelled loads/stores/tensor-core
instructions, compile time, ``sass_loops`` (which trip count weighted which SASS loop) and its
latency term (``ctas_per_sm``, ``occupancy_limit``, ``rounds``, ``path_us``, ``issue_cycles``,
``memory_wait_cycles``, ``round_trips``, ``latency_us``). ``meta`` states the assumptions and holds
``sources``: hashes of the kernel files and of the model's own files the run was made from.

Limits of the capture: a launcher that sizes its grid from the device (persistent kernels) takes its
CPU path here (e.g. 3 programs instead of resident programs x 132 SMs); the modelled count per call
moves only by the per-program set-up code. Launchers must make every launch through
``triton_common.launch``.

Where the parts live
====================

``cases`` (shapes, dtypes, layouts, families, CPU inputs, :func:`capture`), ``specialize`` (step 2,
and finding a job's kernel again in a compile worker), ``compiler`` (steps 3 and 4: the process pool,
``nvdisasm``/``cuobjdump``/ptxas output), ``sass`` (SASS parsing, control flow, loops, static
counts), ``mlir`` (the TTIR/TTGIR source loops, and which kernel argument each global load reads), ``trips`` (``loops=`` -> weights of the SASS loops),
``latency`` (the latency term), ``rows`` (a launch's and a row's numbers), ``runner`` (:func:`model`
over every case, and the child process under the interpreter), ``report`` (``offline.json``,
``offline.md``: a summary per shape, the rows ordered by shape, a legend), ``cli`` (the command line),
``errors``; ``train``, ``train_capture`` and ``train_report``: the training ops' rows per module and
phase against the training floor (``--train``, :func:`model_train`; ``train.py``'s docstring). Their
public functions are importable from ``ghost_kernels.bench.offline`` itself.
"""
from .cases import (
    DTYPES,
    FAMILY_MODULES,
    IMPORT_ERRORS,
    LAYOUTS,
    capture,
    load_families,
    make_inputs,
    select_shapes,
)
from .cli import add_arguments, main, run
from .compiler import (
    MAX_WORKERS,
    compile_job,
    compile_jobs,
    parse_ptxas_log,
    parse_res_usage,
)
from .errors import LoopMismatch, OfflineError, TritonApiMismatch
from .latency import (
    L2_LATENCY_US,
    L2_RESIDENT_BYTES,
    MEMORY_LATENCY_US,
    ctas_per_sm,
    l2_resident,
    launch_latency,
    simulate,
    timing_records,
)
from .mlir import load_sources, mlir_loops, source_loops
from .report import markdown
from .rows import (
    BYTES_NEEDED_IN_FLIGHT,
    DEVICE_NAME,
    H200_COPY_BYTES_PER_S,
    HBM_RATE,
    INSTRUCTION_BUDGET,
    ISSUE_RATE,
    floor_bytes,
    hbm_bytes,
    hbm_us,
    issue_us,
    model_launch,
    predicted_us,
)
from .runner import model, model_rows, source_hashes
from .sass import (
    BARRIERS,
    GLOBAL_LOADS,
    GLOBAL_STORES,
    TENSOR_CORE,
    WAIT_TOKENS,
    Ctrl,
    Instr,
    SassLoop,
    access_bits,
    analyze_sass,
    find_loops,
    is_wait,
    parse_sass,
    split_functions,
)
from .specialize import (
    IMPORTED_PREFIX,
    TARGET_ARCH,
    CompileJob,
    kernel_ref,
    load_module_file,
    resolve_kernel,
    specialize_launch,
    target,
)
from .train import model_train, train_floor
from .trips import assign_trips, weighted_counts

__all__ = [
    "BARRIERS", "BYTES_NEEDED_IN_FLIGHT", "DEVICE_NAME", "DTYPES", "FAMILY_MODULES", "GLOBAL_LOADS", "GLOBAL_STORES",
    "H200_COPY_BYTES_PER_S", "HBM_RATE", "IMPORTED_PREFIX", "IMPORT_ERRORS", "INSTRUCTION_BUDGET", "ISSUE_RATE",
    "L2_LATENCY_US", "L2_RESIDENT_BYTES", "LAYOUTS", "MAX_WORKERS", "MEMORY_LATENCY_US", "TARGET_ARCH",
    "TENSOR_CORE", "WAIT_TOKENS",
    "CompileJob", "Ctrl", "Instr", "LoopMismatch", "OfflineError", "SassLoop", "TritonApiMismatch", "access_bits",
    "add_arguments", "analyze_sass", "assign_trips", "capture", "compile_job", "compile_jobs", "ctas_per_sm",
    "find_loops", "floor_bytes", "hbm_bytes", "hbm_us", "is_wait", "issue_us", "kernel_ref", "l2_resident",
    "launch_latency", "load_families", "load_module_file", "load_sources", "main", "make_inputs", "markdown",
    "mlir_loops", "model", "model_launch", "model_rows", "model_train", "parse_ptxas_log", "parse_res_usage",
    "parse_sass", "predicted_us", "resolve_kernel", "run", "select_shapes", "simulate", "source_hashes",
    "source_loops", "specialize_launch", "split_functions", "target", "timing_records", "train_floor",
    "weighted_counts",
]
