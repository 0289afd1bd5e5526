"""The registries of Kiln's extension axes, read from the schema's discriminated unions.

Each axis is one union in the ``kiln/schema/`` package (or, for the compression passes, the
tuple of settings models the step union is derived from); each member is a registry entry whose
``implementation`` names the module that does the work. ``implementation(setting)`` imports that
module when the work runs (never when a manifest loads), so the core imports nothing above it
and adding a format, family, pass, transport or lab backend is one module plus one union member.

| axis             | union                     | tagged by   | module interface (see docs/ARCHITECTURE.md) |
|------------------|---------------------------|-------------|---------------------------------------------|
| dataset format   | ``schema.Dataset``        | ``format``  | ``locate``, ``load`` (+ ``synthesize``, ``infer``) |
| front end        | ``schema.FrontEnd``       | ``kind``    | ``fit``, ``module``, ``reference``          |
| net family       | ``schema.Architecture``   | ``family``  | ``estimate``, ``build``                     |
| compression pass | ``schema.PASSES``         | ``name``    | ``run(model, ckpt, settings, ctx)``         |
| task             | ``schema.TASKS``          | ``name``    | passes/tasks/: ``loss``, ``validation``, ``fit_split``, ``Judge``, ``train_metrics`` |
| transport        | ``schema.Transport``      | ``kind``    | ``open_transport(instance, lab_dir, local)``|
| lab backend      | ``schema.Lab``            | ``backend`` | ``open_lab``, ``close_lab``                 |
"""

from __future__ import annotations

import importlib
import typing
from types import ModuleType
from typing import Any

from kiln import schema

AXES: dict[str, Any] = {
    "dataset format": schema.Dataset,
    "front end": schema.FrontEnd,
    "net family": schema.Architecture,
    "compression pass": schema.PASSES,  # settings models; CompressionStep is derived from them
    "task": schema.TASKS,  # chosen by the net's objective (kiln/schema/tasks.py)
    "transport": schema.Transport,
    "lab backend": schema.Lab,
}


def _members(union: Any) -> list[type]:
    """The model classes of an Annotated union (tags and discriminators stripped), or of a tuple."""
    if isinstance(union, tuple):
        return list(union)
    inner = typing.get_args(union)[0]
    out = []
    for arg in (typing.get_args(inner) if typing.get_origin(inner) is typing.Union else (inner,)):
        while typing.get_origin(arg) is typing.Annotated:
            arg = typing.get_args(arg)[0]
        out.append(arg)
    return out


def _tag(model: type) -> str:
    if "name" in model.__class_vars__:
        return model.name  # named by a class variable (a compression pass)
    for key in ("format", "family", "kind", "backend"):
        f = model.model_fields.get(key)
        if f is not None and typing.get_origin(f.annotation) is typing.Literal:
            return typing.get_args(f.annotation)[0]
    raise TypeError(f"{model.__name__}: no tag (a Literal format/family/kind/backend field or a name class variable)")


def entries(axis: str) -> dict[str, type]:
    """name -> the settings model that is that entry's registration, for one axis."""
    return {_tag(m): m for m in _members(AXES[axis])}


def module_name(setting: Any) -> str:
    """The implementation module of a setting (a model instance or class of some axis)."""
    cls = setting if isinstance(setting, type) else type(setting)  # a compression step names its pass's
    if getattr(setting, "emulate", None) and hasattr(cls, "emulated_by"):
        return cls.emulated_by  # a lab started on this machine: its emulator wraps the real backend
    return cls.implementation


def implementation(setting: Any) -> ModuleType:
    """Import and return the module that implements ``setting``."""
    return importlib.import_module(module_name(setting))
