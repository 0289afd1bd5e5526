"""The layers stay one-way (docs/ARCHITECTURE.md, "Layers"): the core imports nothing above it, no import
circle anywhere, passes never import each other, passes/ and hil/ never import each other, lab
code never imports the emulated lab. The
walk covers every import statement, also those inside functions (kiln.sources)."""

from __future__ import annotations

from kiln import registry, sources
from kiln.artifacts import ROOT


def modules() -> list[str]:
    out = []
    for pkg in sources.PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out.append(".".join(parts))
    return out


def graph() -> dict[str, list[str]]:
    return {m: sources.imports(m) for m in modules()}


def test_the_walk_sees_imports_inside_functions():
    # hil.deploy imports the transport registry only inside its stage function
    assert "hil.transport" in sources.imports("hil.deploy")
    assert len(modules()) > 40


def test_core_imports_nothing_above_it():
    bad = [(m, i) for m, deps in graph().items() if m.split(".")[0] == "kiln"
           for i in deps if i.split(".")[0] in ("passes", "hil")]
    assert not bad, f"kiln/ imports passes/ or hil/: {bad}"


def _cycle(g: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in g.get(n, []):
            if d.startswith(n + "."):
                continue  # a package naming one of its own modules is not a dependency back on itself
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if state.get(d) is None and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in g:
        if state.get(n) is None and (found := visit(n)):
            return found
    return None


def test_no_import_circle_anywhere():
    cycle = _cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ["b"], "b": []}) is None


def pass_modules() -> set[str]:
    """The stages' entry points under passes/ (passes/pipeline.py) and the registered compression passes."""
    from passes.pipeline import PIPELINE, modules

    stages = {m for s in PIPELINE for m in modules(s) if m.startswith("passes.")}
    return stages | {m.implementation for m in registry.entries("compression pass").values()}


def test_passes_never_import_each_other():
    passes = pass_modules()
    assert {"passes.train", "passes.prune", "passes.quantize", "passes.compile_tvm"} <= passes
    g = graph()
    bad = [(m, i) for m in passes for i in g[m] if i in passes]
    assert not bad, f"passes import passes: {bad}"
    # support modules serve passes, never the reverse
    support = [m for m in g if m.startswith("passes.support")]
    assert support
    bad = [(m, i) for m in support for i in g[m] if i in passes]
    assert not bad, f"support modules import passes: {bad}"


# none: hil.validate scores a board's outputs with the task's torch-free side (kiln/tasks/)
_PASSES_HIL_ALLOWED: set[tuple[str, str]] = set()


def test_passes_and_hil_never_import_each_other():
    """What one needs of the other the core declares as an interface (kiln.measure: the lab the
    tune stage measures in) and dodo hands over as a loaded object."""
    g = graph()
    bad = [(m, i) for m, deps in g.items() for i in deps
           if {m.split(".")[0], i.split(".")[0]} == {"passes", "hil"} and (m, i) not in _PASSES_HIL_ALLOWED]
    assert not bad, f"passes/ and hil/ import each other: {bad}"


def test_the_lab_reaches_into_no_stage():
    """hil/lab/ (inventory, leases, health states, backends) is used by the stages, never the
    reverse: the health check, which deploys, is hil/health_check.py."""
    g = graph()
    stages = {"hil.deploy", "hil.validate", "hil.rpc", "hil.health_check", "hil.nightly"}
    bad = [(m, i) for m, deps in g.items() if m.startswith("hil.lab") for i in deps if i in stages]
    assert not bad, f"lab code imports a stage: {bad}"


def test_lab_code_never_imports_the_emulated_lab():
    g = graph()
    lab = [m for m in g if m.startswith("hil.") and not m.startswith("hil.emulator")]
    bad = [(m, i) for m in lab for i in g[m] if i.startswith("hil.emulator")]
    assert not bad, f"lab code imports the emulated lab: {bad}"


def test_every_registry_entry_names_a_module_with_its_interface():
    interface = {"dataset format": ("locate", "load"), "net family": ("estimate", "build"),
                 "compression pass": ("run",), "transport": ("open_transport",), "lab backend": ("open_lab", "close_lab"),
                 "task": ("loss_fn", "loss_weights", "loss", "validation", "fit_split", "judge", "train_metrics",
                          "checkpoint", "output_shape")}
    for axis, names in interface.items():
        entries = registry.entries(axis)
        assert entries, axis
        for name, model in entries.items():
            path = sources.module_file(model.implementation)
            assert path is not None, f"{axis} '{name}': no module {model.implementation}"
            text = path.read_text()
            for fn in names:
                assert f"\ndef {fn}(" in text, f"{axis} '{name}': {model.implementation} has no {fn}()"
