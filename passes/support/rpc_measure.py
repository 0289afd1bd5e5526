"""MetaSchedule measuring on lab boards over TVM RPC: a runner and a builder for passes/tune.py.

The runner is MetaSchedule's ``RPCRunner`` with Kiln's own callbacks, since its defaults assume
what a board running kiln-runner lacks:
- sessions connect straight to each board's server (``tvm.rpc.connect`` to the local end of its
  port forward, hil/rpc.py), not through an RPC tracker;
- arguments are filled with random values here and copied over RPC: the board's libtvm_runtime
  has no ``tvm.contrib.random.random_fill_for_measure`` (it is in libtvm_runtime_extra);
- several boards of one type are pooled without a tracker: one worker per board, and each
  session takes a free board under a per-board lock file (flock, held until the candidate's
  cleanup; a worker that dies releases it with its file descriptor), each worker trying the
  boards round-robin from the one after its last.
The builder exports each candidate as a ``.so`` linked with the board's ``cc``: MetaSchedule's
default export is a ``.tar`` that the server would have to link itself, and a board has no
compiler.

Callbacks are closures made in ``rpc_runner`` so that cloudpickle sends them by value: the
worker processes need not import Kiln (their sys.path need not hold the repository)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

# Tiny kernels run in microseconds: each measurement repeats them for at least min_repeat_ms,
# three times, so that one run's noise (a timer tick, an SSH packet) does not pick the schedule
NUMBER, REPEAT, MIN_REPEAT_MS = 3, 3, 20
SESSION_TIMEOUT_S = 60  # the server kills a session past this: a hung candidate costs no more


def rpc_runner(endpoints: list[tuple[str, int, str]], lock_dir: Path, session_timeout_s: int = SESSION_TIMEOUT_S):
    """An RPCRunner measuring on ``endpoints`` ((host, port, key) of each board's server), one
    worker per board; lock files go in ``lock_dir``."""
    from tvm.s_tir import meta_schedule as ms

    if not endpoints:
        raise ValueError("rpc_runner: no endpoints")
    eps = [tuple(e) for e in endpoints]
    locks = [str(Path(lock_dir) / f"board-{i}.lock") for i in range(len(eps))]
    timeout = int(session_timeout_s)

    def create_session(_cfg):
        import fcntl
        import os
        import time

        from tvm import rpc

        # a free board: each worker holds one lock at a time, and there are as many workers as
        # boards, so one is free unless a dead worker's cleanup is still under way. Each worker
        # starts looking one board further than last time (kept in its environment: this
        # function is unpickled afresh per candidate), so the boards share the candidates
        start = (int(os.environ.get("KILN_RPC_LAST_BOARD", "-1")) + 1) % len(eps)
        deadline = time.monotonic() + timeout
        while True:
            for i in [*range(start, len(eps)), *range(start)]:
                (host, port, key), path = eps[i], locks[i]
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                try:
                    sess = rpc.connect(host, port, key=key, session_timeout=timeout)
                except BaseException:
                    os.close(fd)
                    raise
                sess._kiln_lock_fd = fd  # released in cleanup
                os.environ["KILN_RPC_LAST_BOARD"] = str(i)
                return sess
            if time.monotonic() > deadline:
                raise TimeoutError(f"no free board among {len(eps)} within {timeout} s")
            time.sleep(0.05)

    def alloc_argument(_sess, dev, args_info, alloc_repeat):
        import numpy as np
        from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

        rng = np.random.default_rng(0)

        def fill(t):
            dtype = str(t.dtype)
            if dtype.startswith(("int", "uint")):
                values = rng.integers(-8 if dtype.startswith("int") else 0, 8, size=t.shape)
            else:
                values = rng.uniform(-1.0, 1.0, size=t.shape)
            t.copyfrom(values.astype(dtype))

        return alloc_argument_common(fill, dev, args_info, alloc_repeat)

    def cleanup(sess, remote_path):
        import os

        try:
            if sess is not None and remote_path is not None:
                sess.remove(remote_path)
        finally:
            fd = getattr(sess, "_kiln_lock_fd", None)
            if fd is not None:
                os.close(fd)

    host, port, key = eps[0]
    return ms.runner.RPCRunner(
        # the tracker fields are only carried along (create_session ignores them), but RPCConfig
        # refuses to be empty
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                       session_timeout_sec=timeout),
        evaluator_config=ms.runner.EvaluatorConfig(number=NUMBER, repeat=REPEAT, min_repeat_ms=MIN_REPEAT_MS,
                                                   enable_cpu_cache_flush=False),
        f_create_session=create_session, f_alloc_argument=alloc_argument, f_cleanup=cleanup,
        max_workers=len(eps),
    )


def so_builder(cc: str):
    """A MetaSchedule builder that compiles candidates in this process (as passes/tune.py's own
    does, for the same reason) and exports each as a shared library linked with ``cc``."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    from passes.support.tvm_build import import_cpu_tensor_intrinsics

    # the CPU tables only, before the first build: it would otherwise import TVM's GPU tables too
    # (minutes of TVMScript parsing on this machine; tvm_build.import_cpu_tensor_intrinsics)
    import_cpu_tensor_intrinsics()

    @derived_object
    class SharedLibraryBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                try:
                    results.append(BuilderResult(export_so(default_build(bi.mod, bi.target, None), cc), None))
                except Exception as e:  # a candidate that fails to build is skipped by the search
                    results.append(BuilderResult(None, f"build failed: {e}"))
            return results

    return SharedLibraryBuilder()


def export_so(rt_mod: Any, cc: str) -> str:
    """``rt_mod`` as a .so in a fresh temp dir (the runner uploads it under its base name)."""
    path = Path(tempfile.mkdtemp(prefix="kiln-ms-")) / "candidate.so"
    rt_mod.export_library(str(path), cc=cc)
    return str(path)
