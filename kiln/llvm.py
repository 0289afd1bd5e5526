"""What the LLVM inside the installed TVM knows about a target triple: its CPU names and its
feature names, so a board file's ``tvm_target`` is checked when it loads (an unknown ``mcpu``
or ``mattr`` would otherwise compile for a generic CPU with one buried LLVM line).

Loading a board must not import TVM (``doit list`` loads every board file), so the lists are
asked of TVM in a subprocess, once per (TVM version, triple), and cached as JSON under
``runtime_cache()/llvm/``; later loads read that file. A subprocess also survives the LLVM
crash an unknown triple causes. The lists are TVM's ``llvm_get_cpu_archlist`` (plus the CPU
aliases LLVM's own table lists that ``llvm_is_valid_cpu`` accepts) and the features every CPU
of the triple enables (``llvm_get_cpu_features``) plus LLVM's feature table (what it prints for
``mattr: [+help]``), which also lists features no CPU enables by default (e.g. strict-align).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from kiln.artifacts import ROOT, read_json, runtime_cache, write_json
from kiln.errors import KilnError

log = logging.getLogger("kiln.llvm")
HOST_CPU = "host"  # mcpu: host is resolved to this machine's CPU at compile time
PROBE_TIMEOUT_S = 300
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


@functools.lru_cache(maxsize=None)
def tvm_version() -> str:
    """The installed TVM's version, read from its package metadata (TVM is not imported)."""
    from importlib import metadata, util

    for dist in ("apache-tvm", "tvm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    spec = util.find_spec("tvm")
    if spec is None or not spec.origin:
        raise KilnError("TVM is not installed (PyPI apache-tvm): board targets cannot be checked against its LLVM")
    origin = Path(spec.origin).parent  # a source build: its location and age stand in for a version
    return "src-" + _SAFE.sub("_", f"{origin}-{int(origin.stat().st_mtime)}")[-80:]


def cache_file(triple: str | None) -> Path:
    """Where LLVM's lists for ``triple`` (None: the host triple) are cached."""
    key = triple if triple else f"host-{platform.machine()}"
    return runtime_cache() / "llvm" / f"tvm-{tvm_version()}" / f"{_SAFE.sub('_', key)}.json"


class ProbeFailed(KilnError):
    """Asking TVM's LLVM about a triple failed (LLVM does not know the triple, or TVM is broken)."""


def known(triple: str | None) -> dict[str, Any]:
    """``{"triple", "cpus", "features", "llvm", "tvm"}`` of ``triple`` (None: the host triple),
    from the cache or else from a TVM subprocess (then cached, atomically)."""
    path = cache_file(triple)
    try:
        info = read_json(path)
        if isinstance(info, dict) and info.get("cpus") and "features" in info:
            return info
    except (OSError, ValueError):
        pass
    info = _ask_tvm(triple)
    try:
        write_json(path, info)
    except OSError as e:  # an unwritable cache costs a TVM query per load, not the load
        log.warning("cannot cache LLVM's lists for %s in %s: %s", triple or "the host triple", path, e)
    return info


def _ask_tvm(triple: str | None) -> dict[str, Any]:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from kiln.llvm import probe; "
            "print('KILN-LLVM ' + json.dumps(probe(sys.argv[2] or None)))")
    try:
        p = subprocess.run([sys.executable, "-c", code, str(ROOT), triple or ""], capture_output=True, text=True,
                           timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ProbeFailed(f"TVM did not answer within {PROBE_TIMEOUT_S} s") from e
    for line in reversed(p.stdout.splitlines()):
        if p.returncode == 0 and line.startswith("KILN-LLVM "):
            return json.loads(line[len("KILN-LLVM "):])
    why = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
    tail = " | ".join(ln.strip() for ln in (p.stderr or "").splitlines()
                      if ln.strip() and not ln.lstrip().startswith("File "))[-400:]
    raise ProbeFailed(f"asking TVM's LLVM failed ({why}){': ' + tail if tail else ''}")


def probe(triple: str | None) -> dict[str, Any]:
    """Run in the subprocess: LLVM's CPU and feature names for ``triple`` (imports TVM)."""
    import tvm
    from tvm.target import Target, codegen

    triple = triple or str(codegen.llvm_get_system_triple())
    base = {"kind": "llvm", "mtriple": triple}
    cpus = {str(c) for c in codegen.llvm_get_cpu_archlist(Target(base))}
    features: set[str] = set()
    for cpu in cpus:
        features |= {str(f) for f in codegen.llvm_get_cpu_features(Target({**base, "mcpu": cpu}))}
    table_cpus, table_features = _llvm_table(base)
    cpus |= {c for c in table_cpus if codegen.llvm_is_valid_cpu(c, triple)}
    features |= table_features
    return {"triple": triple, "tvm": tvm.__version__, "llvm": int(codegen.llvm_version_major()),
            "cpus": sorted(cpus), "features": sorted(features)}


def _llvm_table(base: dict) -> tuple[set[str], set[str]]:
    """(CPU names, feature names) of LLVM's help table for the triple, which LLVM prints to the
    C-level stderr when a feature string holds ``+help``."""
    import tempfile

    from tvm.target import Target, codegen

    with tempfile.TemporaryFile() as f:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            codegen.llvm_get_cpu_features(Target({**base, "mattr": ["+help"]}))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    head, _, feats = text.partition("Available features for this target:")
    _, _, cpus = head.partition("Available CPUs for this target:")
    names = re.compile(r"^  (\S+)\s+- ", re.M)
    return set(names.findall(cpus)), set(names.findall(feats.split("Use +feature")[0]))


def _close(value: str, names: list[str]) -> str:
    close = difflib.get_close_matches(value, names, n=4, cutoff=0.6)
    return f"close matches: {', '.join(close)}" if close else "no close match"


def check_target(target: dict[str, Any], field: str = "tvm_target") -> list[tuple[str, str]]:
    """``(field path, problem)`` for every mcpu/mattr of an llvm target (and of a non-llvm
    target's ``host``) that LLVM does not know; [] when all are known."""
    problems: list[tuple[str, str]] = []
    host = target.get("host")
    if isinstance(host, dict):
        problems += check_target(host, f"{field}.host")
    if target.get("kind") != "llvm":
        return problems
    mcpu, mattr, triple = target.get("mcpu"), target.get("mattr"), target.get("mtriple")
    if triple is not None and not isinstance(triple, str):
        return [*problems, (f"{field}.mtriple", f"expected a target triple string, got {triple!r}")]
    try:
        info = known(triple)
    except ProbeFailed as e:
        where = f"{field}.mtriple" if triple else field
        return [*problems, (where, f"LLVM (TVM {tvm_version()}) cannot target triple '{triple or 'host'}': {e}")]
    llvm = f"LLVM {info['llvm']} (TVM {info['tvm']})"
    on = f"for triple '{info['triple']}'" + ("" if triple else " (the host triple: no mtriple given)")
    if mcpu is not None:
        if not isinstance(mcpu, str):
            problems.append((f"{field}.mcpu", f"expected a CPU name string, got {mcpu!r}"))
        elif mcpu != HOST_CPU and mcpu not in info["cpus"]:
            problems.append((f"{field}.mcpu", f"{llvm} knows no CPU '{mcpu}' {on}; {_close(mcpu, info['cpus'])} "
                                              f"('{HOST_CPU}' is this machine's CPU)"))
    if mattr is not None:
        if not isinstance(mattr, list):
            problems.append((f"{field}.mattr", f"expected a list like ['+neon', '-avx512f'], got {mattr!r}"))
            return problems
        for i, attr in enumerate(mattr):
            where = f"{field}.mattr.{i}"
            if not isinstance(attr, str) or attr[:1] not in ("+", "-") or len(attr) < 2:
                problems.append((where, f"expected '+feature' or '-feature' (LLVM reads a bare name as off), got {attr!r}"))
            elif attr[1:] not in info["features"]:
                problems.append((where, f"{llvm} knows no feature '{attr[1:]}' {on} (got {attr!r}); "
                                        f"{_close(attr[1:], info['features'])}"))
    return problems
