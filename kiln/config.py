"""Load manifests, board types and lab inventories from YAML, with errors that name the file,
the field path and what was expected (never a pydantic traceback)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticError

from kiln.artifacts import ROOT
from kiln.errors import KilnError, ManifestError
from kiln.schema import Board, Inventory, Lab, Project


def projects_dir() -> Path:
    return Path(os.environ.get("KILN_PROJECTS", ROOT / "projects")).resolve()


def targets_dir() -> Path:
    return Path(os.environ.get("KILN_TARGETS", ROOT / "targets")).resolve()


# the default lab, Kiln's emulated one: a path only (the core imports nothing above it)
DEFAULT_LAB = ROOT / "hil" / "emulator" / "lab.yaml"


def default_inventory() -> Path | None:
    """The user's lab inventory ($KILN_LAB), or None for the default (emulated) lab. A KILN_LAB
    that names no file (a directory, a typo) is refused here, naming the variable: later it
    would be a bare path (or an IsADirectoryError) with no word of where it came from."""
    lab = os.environ.get("KILN_LAB")
    if not lab:
        return None
    path = Path(lab).expanduser().resolve()
    if path.is_dir():
        raise ManifestError(f"KILN_LAB={lab}: is a directory; expected a lab inventory YAML file "
                            f"(e.g. {path / 'lab.yaml'}; unset KILN_LAB for the emulated lab)")
    if not path.is_file():
        raise ManifestError(f"KILN_LAB={lab}: no such file; expected a lab inventory YAML file "
                            "(unset KILN_LAB for the emulated lab)")
    return path


def lab_file() -> Path:
    """The lab every command works on: $KILN_LAB, else the default emulated lab."""
    return default_inventory() or DEFAULT_LAB


def _field_path(loc: tuple, raw: Any) -> str:
    """The manifest's own field path of an error: pydantic puts a discriminated union's tag
    into ``loc`` (``dataset.gtsrb.path``); drop every element that is not a key of the data."""
    out, node = [], raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict):
            if part in node or last:
                out.append(str(part))
                node = node.get(part)
            continue  # a union tag
        if isinstance(node, list) and isinstance(part, int):
            out.append(str(part))
            node = node[part] if part < len(node) else None
            continue
        out.append(str(part))
        node = None
    return ".".join(out) or "(top level)"


def _format(path: Path, err: PydanticError, raw: Any) -> str:
    title = err.title
    if "[" in title:  # a union's generated name (tagged-union[function-after[...]]): say what it is
        title = f"'{raw['backend']}' lab" if isinstance(raw.get("backend"), str) else "file"
    lines = [f"{path}: invalid {title}:"]
    for e in err.errors():
        where = _field_path(e["loc"], raw)
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or e["type"] == "missing" else f" (got {got!r})"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (a typo? every field is listed in kiln/schema/ and `doit schema`)"
        lines.append(f"  field '{where}': {msg}{shown}")
    return "\n".join(lines)


def load_model(path: Path, model: Any):
    """Parse ``path`` as YAML and validate it as ``model`` (a model class or an Annotated union);
    raise ManifestError naming the file, the field path and what was expected."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ManifestError(f"{path}: file not found") from e
    except IsADirectoryError as e:
        raise ManifestError(f"{path}: is a directory, expected a YAML file") from e
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a mapping of fields, got {type(raw).__name__}")
    try:
        return TypeAdapter(model).validate_python(raw)
    except PydanticError as e:
        raise ManifestError(_format(path, e, raw)) from e


def project_names() -> list[str]:
    d = projects_dir()
    return sorted(p.parent.name for p in d.glob("*/project.yaml"))


def project_path(app: str) -> Path:
    return projects_dir() / app / "project.yaml"


def board_names() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.yaml"))


def trial_budget(project: Project, board: Board) -> int:
    """MetaSchedule trials for ``project`` on ``board``: the manifest's tuning.trials, else the
    board type's tune_trials."""
    return board.tune_trials if project.tuning.trials is None else project.tuning.trials


def load_board(name: str) -> Board:
    path = targets_dir() / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(board_names()) or "none"
        raise ManifestError(f"unknown board type '{name}': no {path} (known: {known})")
    board = load_model(path, Board)
    if board.name != name:
        raise ManifestError(f"{path}: field 'name' is '{board.name}', expected '{name}' (the file name)")
    # an mcpu or mattr LLVM does not know would compile for a generic CPU with one buried LLVM
    # line: refuse it here (LLVM's lists are cached per TVM version and triple, see kiln/llvm.py)
    from kiln import llvm

    try:
        problems = llvm.check_target(board.tvm_target)
    except KilnError as e:
        raise ManifestError(f"{path}: field 'tvm_target': cannot be checked against LLVM: {e}") from e
    if problems:
        raise ManifestError("\n".join(f"{path}: field '{where}': {what}" for where, what in problems))
    return board


def load_project(app: str) -> Project:
    """Load and cross-check a manifest: its name and every board it targets must exist."""
    path = project_path(app)
    project = load_model(path, Project)
    if project.name != app:
        raise ManifestError(f"{path}: field 'name' is '{project.name}', expected '{app}' (the folder name)")
    known = board_names()
    for i, t in enumerate(project.targets):
        if t not in known:
            raise ManifestError(
                f"{path}: field 'targets.{i}': unknown board '{t}' "
                f"(expected one of {', '.join(known)}; a board type is a file in {targets_dir()})"
            )
    _resolve_arch_files(path, project)
    _infer_data(path, project)
    _check_budget(path, project)
    _check_sizing(path, project)
    return project


def _check_sizing(path: Path, project: Project) -> None:
    """Estimate latency and peak memory on every target board type (the real board, whatever
    the lab has of it) before any data or training work; refuse or warn as sizing.on_violation
    says (kiln/sizing.py). Pure Python: no torch or TVM at load."""
    from kiln import sizing

    sizing.check(str(path), project, {t: load_board(t) for t in project.targets})


# architecture fields that name a file of the team's, relative to the project's directory
ARCH_FILES = ("file", "path")


def _resolve_arch_files(path: Path, project: Project) -> None:
    """Make the architecture's own files (family module's ``file``, family onnx's ``path``)
    absolute, relative to the manifest's directory, and check they exist: the stages get the
    model_dump (and checkpoints keep it), never the project directory."""
    arch = project.architecture
    for name in ARCH_FILES:
        value = getattr(arch, name, None)
        if name not in type(arch).model_fields or not isinstance(value, str):
            continue
        p = Path(value).expanduser()
        p = (p if p.is_absolute() else path.parent / p).resolve()
        if not p.is_file():
            raise ManifestError(f"{path}: field 'architecture.{name}': no file {p} "
                                f"(relative paths are relative to {path.parent})")
        setattr(arch, name, str(p))


def _infer_data(path: Path, project: Project) -> None:
    """A format of a team's own data whose manifest does not list the classes (or a table's
    feature columns) learns them from the data now, cheaply (folder names, a CSV header), so
    the net's output and input sizes are known before any task runs."""
    ds = project.dataset
    if not hasattr(ds, "_inferred") or (ds.classes and getattr(ds, "features", True)):
        return
    from kiln.artifacts import Layout
    from kiln.registry import implementation

    fmt = implementation(ds)
    try:
        root, _ = fmt.locate(ds, Layout(project.name))
        ds._inferred.update(fmt.infer(ds, root))
    except KilnError as e:
        raise ManifestError(f"{path}: {str(e).removeprefix('data: ')}") from e
    if ds.class_names is not None and len(ds.class_names) < 2 and getattr(ds, "labels", "class") != "boxes":
        # (a detector of one class, e.g. person, is a detector: it tells objects from background)
        raise ManifestError(f"{path}: field 'dataset.classes': the data at {root} holds one class "
                            f"({', '.join(ds.class_names) or 'none'}); a classifier needs at least two")
    try:  # what the task checks against the classes (anomaly detection's normal ones) can be checked only now
        project.task.check(project)
    except ValueError as e:
        raise ManifestError(f"{path}: field {e}") from e


def _check_budget(path: Path, project: Project) -> None:
    """Refuse a model over its MACs budget before any data or training work is done. Families
    whose count needs their build (``analytic`` false: module, onnx) are checked by the stage
    that builds them. An input too small for the net (a kernel larger than what is left of it)
    is refused here too."""
    from kiln.nets import estimate

    ds, arch = project.dataset, project.architecture
    if not getattr(type(arch), "analytic", True):
        return
    try:
        c = estimate(arch, tuple(ds.image_size), ds.channels, ds.num_classes)
    except ManifestError as e:
        raise ManifestError(f"{path}: field 'architecture': {str(e).removeprefix('architecture: ')}") from e
    if arch.max_macs is not None and c.macs > arch.max_macs:
        raise ManifestError(
            f"{path}: field 'architecture.max_macs': the model needs {c.macs:,} MACs per inference, "
            f"over its budget of {arch.max_macs:,} (narrow the architecture or shrink dataset.image_size)"
        )


def load_lab(path: Path):
    """Load a lab file (any backend: a static inventory, the emulated lab, ...) and check that
    every instance names a known board type, and that an emulated one's type can be emulated."""
    path = Path(path)
    lab = load_model(path, Lab)
    known = board_names()
    for i, b in enumerate(lab.boards):
        if b.type not in known:
            raise ManifestError(
                f"{path}: field 'boards.{i}.type': board '{b.name}' has unknown type '{b.type}' "
                f"(expected one of {', '.join(known)})"
            )
        if b.emulated and load_board(b.type).emulation is None:
            raise ManifestError(
                f"{path}: field 'boards.{i}.emulated': board '{b.name}' is marked emulated but its type "
                f"'{b.type}' has no 'emulation' section in {targets_dir() / (b.type + '.yaml')}"
            )
    return lab


def load_inventory(path: Path) -> Inventory:
    """A lab whose boards are up, every transport given in full (what each backend hands back)."""
    lab = load_lab(path)
    if not isinstance(lab, Inventory):
        raise ManifestError(f"{path}: field 'backend': a '{lab.backend}' lab must be opened first (hil.lab.open_lab)")
    return lab
