"""Sizing: a design's latency and peak memory on a board type, estimated when the manifest loads.

Why before any build: a design that cannot fit a board (too slow for ``latency_ms``, too big
for ``memory_kb`` or the board's RAM) should be refused in a second, not after an hour of
training, compression and tuning. The estimate is analytic and pure Python (no torch, no TVM:
``doit list`` stays fast): the family's ``kiln.nets.estimate`` counts parameters, MACs and the
peak of live activation elements at batch 1; the board file gives its compute and memory figures
(``compute``, ``runtime_overhead_kb``, ``memory_mb`` in targets/<board>.yaml).

Latency. The runner calls the kernel library with ``--threads <board.cores>`` (hil/deploy.py),
so a tuned library runs on every core: ``CALL_OVERHEAD_MS + kernels * per_kernel_us + macs /
(per-core figure * cores)``, with the int8 figure when the manifest quantizes in mode int8, else
fp32. ``kernels`` is what TVM's fusion leaves of the net (``Complexity.kernels``, counted by the
family's plan: one per conv, dense, pool and gate product) plus the front end's; each tuned one
costs a fixed ``compute.per_kernel_us`` however small it is (the VM's call, the thread pool's
fork and join), and each kernel under the tuning floor (``small_kernels``: never tuned, serial)
``untuned_per_kernel_us``, both measured once per board type by ``bench/sizing.py --calibrate``
(a library of 1 and of 101 trivial kernels). Without that term a recurrent net (4-5 kernels per time step, each a few
hundred MACs) was estimated 4-20x too fast. Whether the library is tuned is what
this lab builds: a trial budget above 0 (``tuning.trials``, else the board's ``tune_trials``) on
a board of this machine's arch (passes/tune.py never tunes on qemu timings). An untuned library
(TVM's default pipeline) has no parallel loops: measured on x86-host, 2 threads ran no faster
than 1 (1.66 ms for 2.8 M MACs both ways, against 80 us tuned), so it is estimated on one core at
``compute.untuned_macs_per_s``.

Peak memory. ``runtime_overhead_kb`` (the runner and TVM runtime with a negligible model) +
``WEIGHT_COPIES`` x weight bytes + the activation arena (peak live activation elements x bytes
per element: 1 for int8, else 4). Measured with the runner on x86-host (VmHWM, 1 input sample):
8,384 KiB for a 90-parameter model, and 3.8 to 4.5 KiB more per KiB of fp32 weights over three
CNNs of 26 k to 706 k parameters (the .so's mapped constants, the copy TVM reads at load, the
deserialised tensors and the VM's constant pool are all resident at the peak), so 4 copies.
With those, the three CNNs' estimates were within 4% of the measurement.

Families whose counts need torch (``module``, ``onnx``: ``TORCH_FAMILIES``) are not sized at
load, where importing torch would make ``doit list`` slow: :func:`estimate` returns None for
them and the report sizes them after the build from the same figures
(:func:`estimate_from`, given the measured complexity).
"""

from __future__ import annotations

import logging
import platform
from typing import Any

from kiln.errors import ManifestError

# nets whose parameter and MAC counts are measured on the torch model (see module docstring)
TORCH_FAMILIES = frozenset({"module", "onnx", "tflite"})
# resident copies of the weights at the runner's peak (measured on x86-host: 3.8-4.5)
WEIGHT_COPIES = 4
# untuned kernels vs tuned ones per core, where a board gives no untuned figure: measured on
# x86-host (traffic-sign CNN, 2.8 M MACs): 1,663 us untuned vs 80 us tuned on one core
UNTUNED_RATIO = 1 / 20
# one call of the library's main (the VM's dispatch, the output copy), whatever the net: measured
# on x86-host with a 2.3 k-MAC CNN (2.3 us at 1 thread); the floor of a tiny net's latency
CALL_OVERHEAD_MS = 0.003

log = logging.getLogger("kiln.sizing")
_warned: set[tuple[str, str, str]] = set()  # (app, board, message) already logged: once per board


def precision(project) -> str:
    """'int8' when a quantize pass in mode int8 is listed (int8 compute), else 'fp32'."""
    for step in project.compression.passes:
        if step.name == "quantize" and step.settings.mode == "int8":
            return "int8"
    return "fp32"


def weight_bytes_per_param(project) -> int:
    """1 when any quantize pass is listed (int8 weights, also weight_only), else 4."""
    return 1 if any(step.name == "quantize" for step in project.compression.passes) else 4


def deployed_architecture(project):
    """The architecture the boards run: a structured prune listed in compression shrinks a
    family's ``widths`` the way passes/prune.py does (each width x (1 - amount), rounded, at
    least 1); other families are sized as declared (an upper bound)."""
    arch = project.architecture
    widths = getattr(arch, "widths", None)
    for step in project.compression.passes:
        s = step.settings
        if step.name == "prune" and s.method in ("structured", "l1_structured") and isinstance(widths, list):
            widths = [max(1, round(w * (1 - s.amount))) for w in widths]
            arch = arch.model_copy(update={"widths": widths})
    return arch


def is_tuned(project, board) -> bool:
    """Whether this lab builds a tuned kernel library for ``board`` (see module docstring)."""
    trials = board.tune_trials if project.tuning.trials is None else project.tuning.trials
    return trials > 0 and board.arch == platform.machine()


def estimate(project, board) -> dict[str, Any] | None:
    """Estimated figures of ``project`` on board type ``board``:
    ``{latency_ms, peak_memory_kb, macs, params, weight_bytes, ...}``; None for a family whose
    counts need torch (sized after the build: :func:`estimate_from`)."""
    if project.architecture.family in TORCH_FAMILIES:
        return None
    from kiln.nets import estimate as complexity

    ds = project.dataset
    c = complexity(deployed_architecture(project), tuple(ds.image_size), ds.channels, ds.num_classes)
    return estimate_from(project, board, c)


def front_end_kernels(project) -> int:
    """Kernels the dataset's front end adds to the library (its module's ``KERNELS``); 0
    without one."""
    import importlib

    fe = getattr(project.dataset, "front_end", None)
    if fe is None:
        return 0
    return int(getattr(importlib.import_module(f"kiln.frontends.{fe.kind}"), "KERNELS", 1))


def front_end_cost(project) -> tuple[int, int]:
    """(float32 constants, MACs) of the dataset's front end, which runs in float inside the
    library (an int8 one too); (0, 0) without one."""
    ds = project.dataset
    fe = getattr(ds, "front_end", None)
    if fe is None:
        return 0, 0
    return fe.cost(ds.layout, ds.raw_shape(), getattr(ds, "sample_rate", None))


def estimate_from(project, board, c) -> dict[str, Any]:
    """The estimate from a known complexity ``c`` (``kiln.nets.Complexity``: params, macs and,
    where the family counts them, activations)."""
    prec = precision(project)
    fe_consts, fe_macs = front_end_cost(project)
    act_elems = int(getattr(c, "activations", 0) or 0)  # 0 until a family counts them
    kernels = int(getattr(c, "kernels", 0) or 0) + front_end_kernels(project)  # 0: not counted
    small = int(getattr(c, "small_kernels", 0) or 0)  # never tuned: serial, the untuned figure
    weight_bytes = int(c.params) * weight_bytes_per_param(project) + 4 * fe_consts
    act_bytes = act_elems * (1 if prec == "int8" else 4)
    mem = {"runtime_kb": float(board.runtime_overhead_kb), "weights_kb": WEIGHT_COPIES * weight_bytes / 1024,
           "activations_kb": act_bytes / 1024}
    out: dict[str, Any] = {
        "macs": int(c.macs), "params": int(c.params), "weight_bytes": weight_bytes, "activations": act_elems,
        "kernels": kernels,
        "front_end": {"constants": fe_consts, "macs": fe_macs} if fe_macs else None,
        "precision": prec, "peak_memory_kb": round(sum(mem.values()), 1), "memory_breakdown_kb": mem,
        "latency_ms": None, "threads": None, "tuned": is_tuned(project, board), "basis": None,
    }
    kind = board.tvm_target.get("kind")
    if board.compute is None:
        out["basis"] = f"board '{board.name}' declares no compute figures: latency not estimated"
    elif kind != "llvm":
        out["basis"] = (f"its kernels run on the board's {kind} device; its compute figures are its CPU's: "
                        "latency not estimated")
    else:
        f = board.compute
        if out["tuned"]:
            per_core = (f.int8_macs_per_s or f.fp32_macs_per_s) if prec == "int8" else f.fp32_macs_per_s
            threads, rate = board.cores, per_core * board.cores
            fe_rate = f.fp32_macs_per_s * board.cores
            per_kernel = ((kernels - small) * f.per_kernel_us + small * f.untuned_per_kernel_us) / max(kernels, 1)
            out["basis"] = f"tuned {prec} kernels: {per_core:.3g} MAC/s per core x {threads} cores"
        else:
            rate = f.untuned_macs_per_s or f.fp32_macs_per_s * UNTUNED_RATIO
            threads, fe_rate = 1, rate
            per_kernel = f.untuned_per_kernel_us
            out["basis"] = f"untuned kernels (no parallel loops): {rate:.3g} MAC/s on one core"
        if fe_macs:
            out["basis"] += f"; front end {fe_macs:,} float MACs"
        if per_kernel and kernels:
            out["basis"] += f"; {kernels} kernels x {per_kernel:.3g} us"
        out["threads"] = threads
        out["latency_ms"] = (CALL_OVERHEAD_MS + kernels * per_kernel * 1e-3 + c.macs / rate * 1e3
                             + fe_macs / fe_rate * 1e3)
    return out


def violations(project, board, est: dict[str, Any] | None) -> list[str]:
    """What ``est`` says ``project`` cannot meet on ``board``: one line each, naming the board,
    the figure, the estimate and the limit."""
    if est is None:
        return []
    req, out = project.requirements, []
    lat = est["latency_ms"]
    if lat is not None and req.latency_ms is not None:
        for q in ("p50", "p99"):
            limit = getattr(req.latency_ms, f"{q}_max")
            if limit is not None and lat > limit:
                out.append(f"board '{board.name}': estimated latency {lat:.4g} ms per inference ({est['basis']}; "
                           f"{est['macs']:,} MACs) exceeds requirements.latency_ms.{q}_max {limit:g} ms")
    mem = est["peak_memory_kb"]
    if req.memory_kb is not None and mem > req.memory_kb.max:
        out.append(f"board '{board.name}': estimated peak memory {mem:,.0f} KiB ({_breakdown(est)}) exceeds "
                   f"requirements.memory_kb.max {req.memory_kb.max:g} KiB")
    ram = board.memory_mb * 1024
    if mem > ram:
        out.append(f"board '{board.name}': estimated peak memory {mem:,.0f} KiB ({_breakdown(est)}) exceeds "
                   f"the board's RAM, memory_mb {board.memory_mb} ({ram:,} KiB)")
    return out


def _breakdown(est: dict[str, Any]) -> str:
    m = est["memory_breakdown_kb"]
    return (f"runtime {m['runtime_kb']:,.0f} + {WEIGHT_COPIES} x weights {m['weights_kb'] / WEIGHT_COPIES:,.0f} "
            f"+ activations {m['activations_kb']:,.0f} KiB")


def check(origin: str, project, boards: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Estimate ``project`` on every board of ``boards`` (name -> Board, its targets); under
    ``sizing.on_violation: refuse`` raise ManifestError listing every violation, under ``warn``
    log each once per board. Returns board name -> estimate (with its ``violations``)."""
    out: dict[str, dict[str, Any] | None] = {}
    problems: list[str] = []
    for name, board in boards.items():
        est = estimate(project, board)
        if est is not None:
            est["violations"] = violations(project, board, est)
            problems += est["violations"]
        out[name] = est
    if not problems:
        return out
    if project.sizing.on_violation == "refuse":
        raise ManifestError(f"{origin}: field 'sizing': the design cannot meet its requirements on its targets "
                            "(estimated before training, kiln/sizing.py):\n  " + "\n  ".join(problems)
                            + "\n(shrink the design, relax the requirement, or set sizing.on_violation: warn)")
    for p in problems:
        key = (project.name, p.split("'")[1], p)
        if key not in _warned:
            _warned.add(key)
            logging.getLogger(f"kiln.board.{key[1]}").warning("app '%s': %s (sizing.on_violation: warn)",
                                                              project.name, p)
    return out
