"""Board types (targets/<board>.yaml): what Kiln compiles for and how its runtime runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from kiln.schema.base import Strict


# --- board types ------------------------------------------------------------------------------


class Emulation(Strict):
    """How this machine stands in for the board: its programs run under qemu-user."""

    kind: Literal["qemu-user"]
    binary: str = Field(description="qemu-user binary, e.g. qemu-aarch64 or qemu-x86_64")
    sysroot: str = Field("/", description="the board's root for its libc/libstdc++ (qemu -L)")
    cpu: str | None = Field(None, description="qemu -cpu model, e.g. cortex-a53 or Haswell")
    max_samples: int | None = Field(
        None, ge=1, description="emulated instances validate on at most this many test samples "
        "(the first ones), for emulators too slow for a whole test set"
    )


class Compute(Strict):
    """What one core of the board sustains, with every core running (the runner uses --threads
    <cores>), on the tuned kernel libraries Kiln builds for it: a figure for the estimates made
    before any build (kiln/sizing.py), not a datasheet peak. Each board file says where its
    figures come from."""

    fp32_macs_per_s: float = Field(gt=0, description="float32 multiply-accumulates per second per core")
    int8_macs_per_s: float | None = Field(
        None, gt=0, description="int8 x int8 -> int32 multiply-accumulates per second per core (a manifest whose "
        "compression quantizes in mode int8); unset: the fp32 figure"
    )
    untuned_macs_per_s: float | None = Field(
        None, gt=0, description="multiply-accumulates per second of an untuned kernel library (TVM's default "
        "pipeline, which runs on one core); unset: fp32_macs_per_s / 20, the ratio measured on x86-host"
    )
    per_kernel_us: float = Field(
        0.0, ge=0, description="fixed cost of one kernel of a tuned library, whatever its size (the VM's call, "
        "the thread pool's fork and join), microseconds; bench/sizing.py --calibrate measures it on the board"
    )
    untuned_per_kernel_us: float = Field(
        0.0, ge=0, description="the same for an untuned library's kernels (serial loops), microseconds"
    )


class Board(Strict):
    """A board *type*: what Kiln compiles for and how its runtime runs."""

    name: str
    description: str = ""
    arch: Literal["x86_64", "aarch64"]
    tvm_target: dict[str, Any] = Field(description="TVM target as a JSON dict")
    cc: str = Field(description="compiler used to link the kernel library")
    runtime: Literal["tvm-cpp", "compile-only"] = Field(
        "tvm-cpp",
        description="tvm-cpp: validated with the C++ runner; compile-only: its kernel library is "
        "built but it cannot run in this lab, so it is reported as not validated, never as passed",
    )
    cores: int = Field(1, ge=1, le=256)
    memory_mb: int = Field(gt=0, description="RAM of the board, MiB: an app whose estimated peak memory exceeds it is refused")
    compute: Compute | None = Field(
        None, description="sustained MACs per second per core, for the latency estimate made when a manifest "
        "loads (kiln/sizing.py); unset: latency is not estimated on this board"
    )
    runtime_overhead_kb: int = Field(
        8400, ge=0, description="resident memory of the runner and TVM runtime with a negligible model, KiB "
        "(the default is the one measured on x86-host; see targets/x86-host.yaml)"
    )
    emulation: Emulation | None = None
    tune_trials: int = Field(
        0, ge=0, description="default MetaSchedule trial budget per model for this board type "
        "(a manifest's tuning.trials overrides it); 0 compiles untuned"
    )

    @field_validator("tvm_target")
    @classmethod
    def _target(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "kind" not in v:
            raise ValueError("needs a 'kind' key, e.g. {kind: llvm, mtriple: ...}")
        return v
