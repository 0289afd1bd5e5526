"""Build kiln-runner into a self-contained deploy bundle for one board architecture.

A bundle is a directory holding ``kiln-runner``, ``libtvm_runtime.so``, ``libtvm_ffi.so`` and
``runner.json``; the runner's rpath is ``$ORIGIN``, so copying the directory to a board is the
whole install (the board needs only libc/libstdc++). The TVM runtime libraries come from the
very same TVM release that compiles the models: for the host architecture from the installed
``tvm``/``tvm_ffi`` packages, for another architecture from that release's manylinux wheels
(``pip download``), so a model.so and the runtime that loads it never drift apart.

    python -m hil.runner.build --arch aarch64 --out build/runner/aarch64
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kiln.artifacts import build_root, sha256_file, write_json
from kiln.errors import KilnError, PassError

DATA_FILES = ("runner.cc", "rpc_server.h")  # kiln.sources: editing them rebuilds the runner
RUNNER_SOURCE = Path(__file__).resolve().with_name(DATA_FILES[0])
# the runner's TVM RPC server mode (--rpc-serve: MetaSchedule measuring on the board), included by runner.cc
RPC_SOURCE = Path(__file__).resolve().with_name(DATA_FILES[1])
RUNNER_NAME = "kiln-runner"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
ARCHES = ("x86_64", "aarch64")
# pip distribution name -> import package that carries its files.
PACKAGES = {"apache-tvm": "tvm", "apache-tvm-ffi": "tvm_ffi"}
# Where the needed files sit inside the packages (same in the installed tree and the wheels).
# TVM's CUDA device API (an x86-cuda board: kiln-runner --device cuda dlopens it) and the CUDA
# runtime it needs (the driver's libcuda.so.1 comes from the GPU machine): put in the host
# bundle when this machine has them, so that a bundle built here runs on a GPU machine.
CUDA_LIBS = {"libtvm_runtime_cuda.so": "tvm/lib/libtvm_runtime_cuda.so"}
CUDART_DIRS = ("/usr/local/cuda/lib64", "/usr/local/cuda/lib", "/usr/local/cuda-13.0/lib", "/usr/local/cuda-13.0/lib64")
LIB_PATHS = {
    "libtvm_runtime.so": "tvm/lib/libtvm_runtime.so",  # includes the Relax VM
    "libtvm_ffi.so": "tvm_ffi/lib/libtvm_ffi.so",
}
# tvm_ffi's headers are all the runner needs; tvm/include/tvm/runtime/*.h pulls in headers the
# wheel lacks (see shared/FIELD-NOTES.md).
INCLUDE_PATHS = ("tvm_ffi/include", "tvm_ffi/3rdparty/dlpack/include")
# pip also accepts wheels with older manylinux tags under these (the aarch64 ones are 2_24/2_27).
WHEEL_PLATFORMS = {"x86_64": "manylinux_2_28_x86_64", "aarch64": "manylinux_2_28_aarch64"}
_MARKER = "complete.json"


def host_arch() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)


def tvm_versions() -> dict[str, str]:
    """Versions of the TVM distributions in this venv; the runtime must match the compiler."""
    try:
        return {dist: importlib.metadata.version(dist) for dist in PACKAGES}
    except importlib.metadata.PackageNotFoundError as exc:
        raise PassError(f"runner: TVM is not installed in {sys.prefix}: {exc}") from exc


def compiler_for(arch: str) -> str:
    return "g++" if arch == host_arch() else f"{arch}-linux-gnu-g++"


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise PassError(f"runner: unknown arch {arch!r}, expected one of {', '.join(ARCHES)}")


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _check_call(cmd: list[str], what: str, timeout: float) -> None:
    """Run a build command; a failure is a PassError quoting the command and its stderr tail."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PassError(f"runner: `{' '.join(cmd)}` failed: {exc}") from exc
    if proc.returncode != 0:
        raise PassError(f"runner: {what} failed: `{' '.join(cmd)}` exited {proc.returncode}:\n{_tail(proc.stderr)}")


def _layout(roots: dict[str, Path]) -> dict:
    """The runtime_libs() dict given the directory holding each package (site-packages-like)."""
    def at(rel: str) -> Path:
        return roots[rel.split("/", 1)[0]] / rel  # first component is the package name
    libs: dict = {name: at(rel) for name, rel in LIB_PATHS.items()}
    libs["include_dirs"] = [at(rel) for rel in INCLUDE_PATHS]
    libs["cuda"] = {name: at(rel) for name, rel in CUDA_LIBS.items() if rel.split("/", 1)[0] in roots
                    and at(rel).is_file()}
    if libs["cuda"]:
        cudart = next((Path(d) / "libcudart.so.13" for d in CUDART_DIRS if (Path(d) / "libcudart.so.13").is_file()), None)
        if cudart is not None:
            libs["cuda"]["libcudart.so.13"] = cudart
    return libs


def _missing(libs: dict) -> list[Path]:
    paths = [libs[name] for name in RUNTIME_LIBS] + list(libs["include_dirs"])
    return [p for p in paths if not p.exists()]


def _installed_libs() -> dict:
    # find_spec locates the packages without importing tvm (which would load the 260 MB compiler).
    roots = {}
    for pkg in PACKAGES.values():
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise PassError(f"runner: Python package {pkg!r} not found in {sys.prefix}")
        roots[pkg] = Path(next(iter(spec.submodule_search_locations))).parent
    return _layout(roots)


def _download_wheels(arch: str, versions: dict[str, str], wheel_dir: Path) -> dict[str, Path]:
    """pip-download the two pinned wheels for ``arch`` (no deps) and return dist -> wheel path."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--platform", WHEEL_PLATFORMS[arch], "--python-version", py_version,
           "--dest", str(wheel_dir)] + [f"{dist}=={ver}" for dist, ver in versions.items()]
    _check_call(cmd, f"downloading the TVM runtime wheels for {arch}", timeout=900)
    wheels = {}
    for dist, ver in versions.items():
        # Wheel file names normalise '-' to '_' in the project name.
        found = sorted(wheel_dir.glob(f"{dist.replace('-', '_')}-{ver}-*.whl"))
        if not found:
            raise PassError(f"runner: `{' '.join(cmd)}` succeeded but left no {dist} {ver} wheel "
                            f"in {wheel_dir}")
        wheels[dist] = found[-1]
    return wheels


def _extract(wheels: dict[str, Path], dest: Path) -> None:
    """Unzip only the two libraries and the tvm_ffi headers, into a temp dir renamed to dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        wanted = tuple(LIB_PATHS.values())
        prefixes = tuple(rel + "/" for rel in INCLUDE_PATHS)
        for wheel in wheels.values():
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.namelist():
                    if (member in wanted or member.startswith(prefixes)) and ".." not in member:
                        zf.extract(member, tmp)
        missing = _missing(_layout({pkg: tmp for pkg in PACKAGES.values()}))
        if missing:
            raise PassError(f"runner: wheels {', '.join(w.name for w in wheels.values())} lack "
                            f"{', '.join(str(p.relative_to(tmp)) for p in missing)}")
        write_json(tmp / _MARKER, {w.name: sha256_file(w) for w in wheels.values()})
        if dest.exists():  # a stale or partial extraction (no marker): replace it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def runtime_libs(arch: str, cache_dir: str | os.PathLike) -> dict:
    """Paths of ``libtvm_runtime.so``, ``libtvm_ffi.so`` and ``include_dirs`` for ``arch``.

    Keys: "libtvm_runtime.so", "libtvm_ffi.so" (Path each), "include_dirs" (list of Path).
    The host arch uses the installed packages; another arch downloads the matching wheels into
    ``cache_dir`` once and reuses the extraction afterwards.
    """
    _check_arch(arch)
    if arch == host_arch():
        libs = _installed_libs()
        where = f"the installed tvm/tvm_ffi packages in {sys.prefix}"
    else:
        versions = tvm_versions()
        cache_dir = Path(cache_dir).resolve()
        tag = "-".join(f"{d}-{v}" for d, v in versions.items())
        dest = cache_dir / "tvm-runtime" / arch / tag
        libs = _layout({pkg: dest for pkg in PACKAGES.values()})
        if not (dest / _MARKER).exists() or _missing(libs):
            _extract(_download_wheels(arch, versions, cache_dir / "wheels" / arch), dest)
        where = str(dest)
    missing = _missing(libs)
    if missing:
        raise PassError(f"runner: {where} lack {', '.join(map(str, missing))}")
    return libs


def _compiler_version(cxx: str) -> str:
    proc = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.returncode == 0 and proc.stdout else "unknown"


def _compile(arch: str, libs: dict, bundle: Path) -> str:
    """Compile runner.cc into bundle/kiln-runner against the libs already copied into bundle."""
    cxx = compiler_for(arch)
    if shutil.which(cxx) is None:
        package = "g++" if cxx == "g++" else f"g++-{arch.replace('_', '-')}-linux-gnu"
        raise PassError(f"runner: C++ compiler `{cxx}` for {arch} not found on PATH "
                        f"(Debian package {package})")
    cmd = [cxx, "-std=c++17", "-O2", "-Wall"]
    for inc in libs["include_dirs"]:
        cmd += ["-isystem", str(inc)]  # -isystem: TVM's headers are not ours to warn about
    cmd += [str(RUNNER_SOURCE), "-o", str(bundle / RUNNER_NAME),
            # Link against the copies in the bundle; $ORIGIN makes the bundle relocatable.
            "-L", str(bundle), "-ltvm_runtime", "-ltvm_ffi", "-ldl", "-Wl,-rpath,$ORIGIN"]
    _check_call(cmd, f"compiling {RUNNER_SOURCE.name} for {arch}", timeout=600)
    return cxx


def build_runner(arch: str, out_dir: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Build the deploy bundle for ``arch`` at ``out_dir`` and return ``out_dir/kiln-runner``.

    The bundle is assembled in a temp dir beside ``out_dir`` and renamed into place, so a failed
    build leaves either the previous bundle or nothing, never a half-built one.
    """
    _check_arch(arch)
    out_dir = Path(out_dir).resolve()
    libs = runtime_libs(arch, cache_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    cxx = compiler_for(arch)
    key = _bundle_key(arch, cxx, libs)
    cached = Path(cache_dir) / "runners" / f"{arch}-{key[:16]}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if _intact(cached):
            for name in (RUNNER_NAME, *RUNTIME_LIBS, *_cuda_names(cached), "runner.json"):
                shutil.copy2(cached / name, tmp / name)
        else:
            for name in RUNTIME_LIBS:
                shutil.copyfile(libs[name], tmp / name)
                os.chmod(tmp / name, 0o755)
            for name, src in libs["cuda"].items() if arch == host_arch() else ():
                shutil.copyfile(src, tmp / name)
                os.chmod(tmp / name, 0o755)
            _compile(arch, libs, tmp)
            write_json(tmp / "runner.json", {
                "arch": arch,
                "compiler": cxx,
                "compiler_version": _compiler_version(cxx),
                "tvm_versions": tvm_versions(),
                "source_sha256": sha256_file(RUNNER_SOURCE),
                "rpc_source_sha256": sha256_file(RPC_SOURCE),
                "files": {name: sha256_file(tmp / name) for name in (RUNNER_NAME, *RUNTIME_LIBS, *_cuda_names(tmp))},
            })
            _store(tmp, cached)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _swap_into_place(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir / RUNNER_NAME


# Compiled bundles are kept in the runtime cache by what went into them, so that every build
# directory on the machine (a second checkout, the test suite's many) copies the bundle instead
# of compiling runner.cc again: a change to the sources, the compiler, its version or the TVM
# runtime libraries makes another key and a fresh compile.
def _bundle_key(arch: str, cxx: str, libs: dict) -> str:
    import hashlib

    version = _compiler_version(cxx) if shutil.which(cxx) else "missing"  # _compile says what is missing
    parts = {"arch": arch, "compiler": cxx, "compiler_version": version, "tvm": tvm_versions(),
             "sources": [sha256_file(RUNNER_SOURCE), sha256_file(RPC_SOURCE)],
             "libs": [sha256_file(libs[name]) for name in RUNTIME_LIBS], "build": sha256_file(Path(__file__)),
             "cuda": sorted(libs["cuda"]) if arch == host_arch() else []}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cuda_names(bundle: Path) -> list[str]:
    """The CUDA runtime files a bundle holds (none in an aarch64 bundle or without TVM's CUDA runtime)."""
    return [n for n in (*CUDA_LIBS, "libcudart.so.13") if (bundle / n).is_file()]


def _intact(cached: Path) -> bool:
    """A cached bundle whose files still have the hashes its runner.json records (a damaged or
    half-copied entry is compiled again)."""
    try:
        files = json.loads((cached / "runner.json").read_text())["files"]
        return set(files) == {RUNNER_NAME, *RUNTIME_LIBS, *_cuda_names(cached)} and all(
            sha256_file(cached / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _store(bundle: Path, cached: Path) -> None:
    """A copy of a freshly compiled bundle into the cache, renamed into place whole (a rival
    process that stored the same key first wins; either copy is the same build)."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
    except OSError:
        return  # a read-only cache only costs the next build a compile
    try:
        for name in (RUNNER_NAME, *RUNTIME_LIBS, *_cuda_names(bundle), "runner.json"):
            shutil.copy2(bundle / name, staging / name)
        if _intact(cached):
            return
        if cached.exists():
            shutil.rmtree(cached, ignore_errors=True)
        os.replace(staging, cached)
    except OSError:
        pass  # another process renamed its copy into place first
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(new: Path, dest: Path) -> None:
    # os.replace cannot overwrite a non-empty directory: move the old bundle aside first.
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.replace(dest, old / "bundle")
        os.replace(new, dest)
        shutil.rmtree(old)
    else:
        os.replace(new, dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.runner.build",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=ARCHES)
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to (re)create")
    parser.add_argument("--cache", type=Path, default=build_root() / "cache",
                        help="where downloaded wheels and extracted runtimes are kept")
    args = parser.parse_args(argv)
    try:
        runner = build_runner(args.arch, args.out, args.cache)
    except KilnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def bundle(arch: str) -> Path:
    """The runner stage: the bundle for ``arch`` at build/runner/<arch>, runtimes cached in $KILN_CACHE."""
    from kiln.artifacts import runner_dir, runtime_cache

    return build_runner(arch, runner_dir(arch), runtime_cache())
