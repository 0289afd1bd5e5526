"""Data-parallel training over processes and machines (training.distributed), launched with
torchrun, not a loop of Kiln's own.

The train task (passes/train.py) pickles what it trains (the loaded Project and its Layout) into
a job file and runs ``python -m passes.support.distributed torchrun <failures.json> <torchrun
args> -m passes.train <job>``: torchrun's own entry point (``torch.distributed.run.run``), called
so that a failed rank comes back as torch's ChildFailedError (which rank, its exit code, its
pid) written to a JSON file, rather than parsed out of torchrun's log. Every rank runs
``passes.train`` on the job: it joins the process group (gloo on CPU, NCCL on CUDA), trains
with DDP (passes/support/training.py ``fit``), and only the writer rank (global rank 0 on one
machine; on several, local rank 0 of the machine whose train task launched the job) writes
model.pt and metrics.json, each atomically. A rank that dies stops torchrun (no restarts), the
others are stopped with it, and the task fails with a PassError naming the rank and its exit;
nothing is written.

One machine: ``torchrun --standalone``. Several: every machine runs torchrun with the c10d
rendezvous at ``rdzv_endpoint``; the others join with ``python -m passes.support.distributed
join <app>`` (same manifest and data; they write nothing). Where a machine's hostname does not
resolve to the network the machines share, set on it PET_LOCAL_ADDR (torchrun's --local-addr: its
address there; the train task's machine uses the rendezvous host) and GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME (the interface the ranks talk over).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from kiln.errors import PassError

log = logging.getLogger("kiln.train")

JOB_ENV = "KILN_TRAIN_JOB"  # set in every rank: the job file (a worker, not a launcher)
KILL_ENV = "KILN_TEST_KILL_RANK"  # tests only: "<rank>:<epoch>" SIGKILLs that rank in that epoch


def inside() -> bool:
    """True in a rank that torchrun started for a job (the train stage then trains, not launches)."""
    return bool(os.environ.get(JOB_ENV)) and "LOCAL_RANK" in os.environ


def backend(setting: str, device) -> str:
    """training.distributed.backend: auto is nccl on CUDA, gloo on CPU."""
    if setting == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if setting == "nccl" and device.type != "cuda":
        raise PassError("training.distributed.backend: nccl needs training.device on CUDA (gloo runs on CPU)")
    return setting


def init(cfg, device) -> tuple[int, int, bool]:
    """Join the job's process group (in a rank): (rank, world size, writes the outputs)."""
    import datetime

    import torch.distributed as dist

    if device.type == "cuda":
        import torch

        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend(cfg.distributed.backend, device),
                            timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    with open(os.environ[JOB_ENV], "rb") as f:
        writer = pickle.load(f)["writer"]
    return dist.get_rank(), dist.get_world_size(), writer and int(os.environ["LOCAL_RANK"]) == 0


def rank_device(device):
    """This rank's device: cuda:<local rank> on CUDA (one process per GPU), else ``device``."""
    import torch

    return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device.type == "cuda" else device


def done() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def fault_hook(rank: int, epoch: int) -> None:
    """Tests only (``$KILN_TEST_KILL_RANK`` = "<rank>:<epoch>"): this rank dies by SIGKILL in
    that epoch, as a machine lost mid-epoch would."""
    want = os.environ.get(KILL_ENV)
    if want and want == f"{rank}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)


def torchrun_args(dist_cfg, job: Path, host: bool = True) -> list[str]:
    """torchrun's arguments for the job (the ranks run ``python -m passes.train <job>``).
    ``host``: this machine serves the c10d rendezvous at rdzv_endpoint (the train task's does;
    torchrun's own guess compares the endpoint with the hostname's addresses, which a machine
    reached on another interface, or a network namespace, does not match)."""
    args = [f"--nproc-per-node={dist_cfg.nproc_per_node}", "--max-restarts=0"]
    if dist_cfg.rdzv_endpoint is None:
        args.append("--standalone")
    else:
        args += [f"--nnodes={dist_cfg.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={dist_cfg.rdzv_endpoint}",
                 "--rdzv-id=kiln-train", f"--rdzv-conf=join_timeout={int(dist_cfg.timeout_s)},is_host={int(host)}"]
        if host and "PET_LOCAL_ADDR" not in os.environ:
            # the address the other machines reach this one at (the workers' store, if this
            # machine gets node rank 0), not what its hostname resolves to
            args.append(f"--local-addr={dist_cfg.rdzv_endpoint.rsplit(':', 1)[0].strip('[]')}")
    return [*args, "-m", "passes.train", str(job)]


def launch(project, layout, writer: bool = True, timeout_s: float | None = None) -> None:
    """Run the train stage of ``project`` under torchrun (training.distributed) and wait; raise
    PassError naming the failed rank and its exit. ``writer``: this machine's local rank 0
    writes model.pt and metrics.json (False on a machine that joins another's job)."""
    d = project.training.distributed
    layout.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".train-job-", dir=layout.root) as tmp:
        job, failures = Path(tmp) / "job.pkl", Path(tmp) / "failures.json"
        with open(job, "wb") as f:
            pickle.dump({"project": project, "layout": layout, "writer": writer}, f)
        cmd = [sys.executable, "-m", "passes.support.distributed", "torchrun", str(failures), *torchrun_args(d, job, host=writer)]
        env = dict(os.environ, **{JOB_ENV: str(job)})
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        log.info("train %s: torchrun, %d process(es) x %d machine(s)%s", project.name, d.nproc_per_node, d.nnodes,
                 f", rendezvous at {d.rdzv_endpoint}" if d.rdzv_endpoint else "")
        try:
            p = subprocess.run(cmd, env=env, cwd=root, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise PassError(f"train {project.name}: torchrun did not finish in {timeout_s:g} s") from e
        if p.returncode != 0:
            raise PassError(f"train {project.name}: distributed training failed: {_why(failures, p.returncode)}; "
                            "nothing was written")


def _why(failures: Path, returncode: int) -> str:
    """The failed ranks as torchrun saw them, else torchrun's own exit."""
    try:
        rows = json.loads(failures.read_text())
    except (OSError, ValueError):
        return f"torchrun exited {returncode} (see its log above)"
    out = []
    # the root cause first: torchrun SIGTERMs the other ranks once one has failed
    for r in sorted(rows, key=lambda r: (r["exitcode"] == -signal.SIGTERM, r.get("time", 0))):
        code = r["exitcode"]
        how = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
               else f"exit code {code}")
        out.append(f"rank {r['rank']} (local rank {r['local_rank']}, pid {r['pid']}) {how}"
                   + (f": {r['message']}" if r.get("message") and code > 0 else ""))
    return "; ".join(out) or f"torchrun exited {returncode}"


def _torchrun(failures: str, argv: list[str]) -> int:
    """torchrun's entry point (torch.distributed.run), with its ChildFailedError kept as JSON."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        rows = []
        for rank, f in sorted(e.failures.items()):
            msg = f.message if isinstance(f.message, str) else ""
            if isinstance(f.message, dict):
                msg = (f.message.get("message") or "").strip().splitlines()[-1:] or ""
                msg = msg[0] if msg else ""
            rows.append({"rank": rank, "local_rank": f.local_rank, "pid": f.pid, "exitcode": f.exitcode,
                         "time": f.timestamp,
                         "message": msg if not msg.startswith("To enable traceback") else ""})
        Path(failures).write_text(json.dumps(rows))
        return 1
    return 0


def join(app: str) -> None:
    """Join the training job of ``app`` that another machine's train task launched (the same
    manifest and data here; training.distributed's rendezvous); this machine writes nothing."""
    from kiln.artifacts import Layout
    from kiln.config import load_project

    project = load_project(app)
    if project.training.distributed is None or project.training.distributed.nnodes < 2:
        raise PassError(f"join {app}: training.distributed.nnodes is not above 1: there is no other machine to join")
    launch(project, Layout(app), writer=False)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(argv) >= 2 and argv[0] == "torchrun":
        return _torchrun(argv[1], argv[2:])
    if len(argv) == 2 and argv[0] == "join":
        try:
            join(argv[1])
        except PassError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m passes.support.distributed join <app>", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
