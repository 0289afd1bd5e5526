"""Kiln's leases over labgrid, measured on the multi-host lab of this machine (hil/emulator/
multihost.py: a real labgrid coordinator, two exporter hosts, two runner hosts).

Phases (each prints a table; ``--phases`` picks them):

acquire  acquire + release of a free place from a runner host, ``--rounds`` times: the overhead
         a job pays for its lease (median, p90, max).
expiry   a holder on run1 killed with -9; a waiter on run2 takes the place: seconds from the kill
         (the lab file's lease_ttl_s; labgrid alone never frees it).
chaos    ``--cycles`` random faults while ``--workers`` holders on both runner hosts acquire,
         hold and release the four places: kill -9 of a holder (restarted), a runner host cut
         off and healed, an exporter cut off or killed and restarted, the coordinator killed and
         restarted. Every holder logs when it held each place, by its own lease's word (from
         acquire until release, or until it last saw ``lease.valid``); a dead holder's hold ends
         at its kill. Two holds of one place that overlap are a double allocation (goal: 0).
         Runs on a copy of the lab file with ``--ttl`` (short, so that leases lapse often).
nightly  wall time of `doit nightly` (two tiny apps on the four boards): one runner alone, two
         runners at once sharing the lab, and one runner doing both nights back to back;
         ``--rounds`` interleaved rounds.

    .venv/bin/python bench/lab_chaos.py [--phases acquire,expiry,chaos,nightly] [--cycles 200]
        [--ttl 3] [--workers 4] [--rounds 3] [--seed 0]

Takes the machine's one multi-host lab (stop another first); leaves it down. Needs root.
Run with nothing else at work on the machine.

``--smoke``: the same real lab for acquire and expiry (1 round) and chaos (4 cycles, 2 holders),
its files in a temporary folder; the nightly phase is not run (two apps built and deployed on
four boards, night after night: minutes), and the output says so. About a minute.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LAB = ROOT / "hil" / "emulator" / "multihost.yaml"
PLACES = ("x86-host", "rpi3", "rpi4", "x86-avx2")


def spread(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
    return f"median {statistics.median(xs):8.3f}  p90 {p90:8.3f}  min {xs[0]:8.3f}  max {xs[-1]:8.3f}  (n={len(xs)})"


# -- a worker: runs on a runner host --------------------------------------------------------------

def worker(lab_path: str, log_path: str, seed: int) -> None:
    """Acquire a random place, hold it a random while (checking the lease), release; forever.
    Logs {"ev": "start"|"end", ...} lines (flushed: a kill -9 loses nothing written)."""
    from hil.lab import labgrid
    from kiln.config import load_lab

    rnd = random.Random(seed)
    lab = load_lab(Path(lab_path))
    out = open(log_path, "a", buffering=1)
    c = labgrid.client_for(lab)
    me = os.getpid()
    while True:
        place = rnd.choice(PLACES)
        try:
            lease = labgrid.acquire_place(c, place, wait=True, timeout_s=rnd.uniform(0.5, 3))
        except labgrid.LabgridError:
            time.sleep(0.2)
            continue
        if lease is None:
            continue
        t0 = time.time()
        out.write(json.dumps({"ev": "start", "pid": me, "place": place, "t": t0, "id": c.identity}) + "\n")
        seen_valid, until = t0, t0 + rnd.uniform(0.2, 2.0)
        while time.time() < until:
            if not lease.valid:  # lost, or its stream to the coordinator broke: stop trusting it
                break
            seen_valid = time.time()  # the job would use results up to here
            time.sleep(0.05)
        lost = lease.lost
        # the hold ends here (the job is done with the board): logged before the release, which
        # may block for seconds when this host is cut off (and a kill then would lose the line)
        out.write(json.dumps({"ev": "end", "pid": me, "place": place, "t": seen_valid, "lost": lost,
                              "reason": lease.lost_reason}) + "\n")
        lease.release()


# -- the orchestrator ------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        if args.smoke:
            from bench._smoke import smoke_dir

            self.dir = smoke_dir() / "lab_chaos"
        else:
            self.dir = ROOT / "build" / "bench" / "lab_chaos"
        self.dir.mkdir(parents=True, exist_ok=True)
        os.environ["KILN_BUILD"] = str(self.dir / "build")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from hil.emulator import multihost

        self.mh = multihost
        multihost.down(forget=True)  # fresh places: no health tag or lease left by an earlier run
        self.rows: list[tuple[str, str]] = []

    def lab_file(self, ttl: float | None) -> Path:
        import yaml

        raw = yaml.safe_load(LAB.read_text())
        if ttl is not None:
            raw["lease_ttl_s"] = ttl
        path = self.dir / f"lab-ttl{ttl or raw.get('lease_ttl_s', 'default')}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    def up(self, path: Path):
        from kiln.config import load_lab

        lab = load_lab(path)
        self.mh.up(lab, path)
        return lab

    def run_py(self, runner: str, argv: list[str], **kw) -> subprocess.Popen:
        return self.mh.run_in(runner, [sys.executable, *argv], cwd=ROOT, **kw)

    # acquire overhead
    def acquire(self) -> None:
        path = self.lab_file(None)
        self.up(path)
        code = ("import json, sys, time\nfrom hil.lab import labgrid\nfrom kiln.config import load_lab\n"
                f"c = labgrid.client_for(load_lab('{path}'))\nacq, rel = [], []\n"
                f"for i in range({self.args.rounds * 10}):\n"
                "    t0 = time.perf_counter(); lease = labgrid.acquire_place(c, 'rpi4', wait=True, timeout_s=30)\n"
                "    t1 = time.perf_counter(); lease.release(); t2 = time.perf_counter()\n"
                "    acq.append(t1 - t0); rel.append(t2 - t1)\n"
                "print(json.dumps({'acquire': acq, 'release': rel}))\nlabgrid.close_clients()\n")
        p = self.run_py("run1", ["-c", code], stdout=subprocess.PIPE, text=True)
        r = json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1])
        self.rows.append(("acquire (ms, place + lease tag)", spread([x * 1e3 for x in r["acquire"]])))
        self.rows.append(("release (ms)", spread([x * 1e3 for x in r["release"]])))

    # lease expiry after kill -9
    def expiry(self) -> None:
        path = self.lab_file(None)
        lab = self.up(path)
        took = []
        for i in range(self.args.rounds):
            holder = self.run_py("run1", ["-m", "hil.lab.labgrid", "hold", "rpi4", str(path), "--wait", "60"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert json.loads(holder.stdout.readline())["state"] == "held"
            time.sleep(1 + i % 3)
            holder.kill()
            killed = time.time()
            holder.wait()
            w = self.run_py("run2", ["-m", "hil.lab.labgrid", "hold", "rpi4", str(path), "--wait", "90", "--for", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            got = json.loads(w.stdout.readline())
            w.communicate(timeout=60)
            assert got["state"] == "held", got
            took.append(got["t"] - killed)
        self.rows.append((f"expiry after kill -9 (s, ttl {lab.lease_ttl_s:g} s)", spread(took)))

    # chaos
    def chaos(self) -> None:
        a = self.args
        path = self.lab_file(a.ttl)
        lab = self.up(path)
        rnd = random.Random(a.seed)
        logs = self.dir / "chaos"
        logs.mkdir(exist_ok=True)
        for f in logs.glob("*.jsonl"):
            f.unlink()
        kills: dict[int, float] = {}
        workers: dict[int, tuple[subprocess.Popen, str]] = {}

        def spawn(slot: int) -> None:
            runner = ("run1", "run2")[slot % 2]
            p = self.run_py(runner, [str(Path(__file__).resolve()), "worker", str(path), str(logs / f"w{slot}.jsonl"),
                                     str(rnd.randrange(1 << 30))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            workers[slot] = (p, runner)

        for s in range(a.workers):
            spawn(s)
        faults: dict[str, int] = {}
        t_start = time.time()
        try:
            for cycle in range(a.cycles):
                time.sleep(rnd.uniform(0.3, 1.5))
                kind = rnd.choices(["kill", "partition-runner", "partition-exporter", "exporter", "coordinator"],
                                   weights=[6, 2, 1, 1, 1])[0]
                faults[kind] = faults.get(kind, 0) + 1
                if kind == "kill":
                    slot = rnd.randrange(a.workers)
                    p, _ = workers[slot]  # `ip netns exec` execs the worker: p.pid is the worker's
                    p.send_signal(signal.SIGKILL)
                    kills[p.pid] = time.time()
                    p.wait()
                    spawn(slot)
                elif kind.startswith("partition"):
                    host = rnd.choice(("run1", "run2") if kind.endswith("runner") else ("exp1", "exp2"))
                    self.mh.partition(host)
                    time.sleep(rnd.uniform(0.5, 2.5) * a.ttl)
                    self.mh.heal(host)
                elif kind == "exporter":
                    exp = rnd.choice(("exp1", "exp2"))
                    self.mh.kill_exporter(exp)
                    time.sleep(rnd.uniform(0.5, 3))
                    self.mh.start_exporter(exp)
                else:
                    self.mh.kill_coordinator()
                    time.sleep(rnd.uniform(0.2, 2))
                    self.mh.start_coordinator()
                if (cycle + 1) % 20 == 0:
                    print(f"chaos: {cycle + 1}/{a.cycles} cycles, {time.time() - t_start:.0f} s", flush=True)
        finally:
            for p, _ in workers.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    kills[p.pid] = time.time()
                p.wait()
            for h in ("run1", "run2", "exp1", "exp2"):
                self.mh.heal(h)
        holds = self._holds(logs, kills)
        overlaps = []
        for place in PLACES:
            end, by = float("-inf"), None  # the latest end so far among the earlier holds, and whose
            for t0, t1, _, who, _lost in sorted(h for h in holds if h[2] == place):
                if t0 < end and who != by:
                    overlaps.append((place, by, who, round(end - t0, 3)))
                if t1 > end:
                    end, by = t1, who
        lost = sum(1 for h in holds if h[4])
        self.rows.append((f"chaos ({a.cycles} cycles, ttl {lab.lease_ttl_s:g} s, {a.workers} holders)",
                          f"{len(holds)} holds, {lost} ended by a lost lease, faults {faults}, "
                          f"{time.time() - t_start:.0f} s"))
        self.rows.append(("double allocations (overlapping holds of one place)", str(len(overlaps))))
        for o in overlaps[:10]:
            print("  overlap:", o)
        (self.dir / "chaos.json").write_text(json.dumps({"holds": holds, "overlaps": overlaps, "faults": faults}))

    @staticmethod
    def _holds(logs: Path, kills: dict[int, float]) -> list[tuple]:
        holds = []
        for f in logs.glob("*.jsonl"):
            open_ = {}
            for raw in f.read_text().splitlines():
                try:
                    e = json.loads(raw)
                except ValueError:
                    continue  # a line cut by the kill
                if e["ev"] == "start":
                    open_[e["pid"]] = e
                elif e["pid"] in open_:
                    s = open_.pop(e["pid"])
                    holds.append((s["t"], e["t"], s["place"], s["id"], bool(e["lost"])))
            for pid, s in open_.items():  # killed while holding: its hold ends at the kill
                holds.append((s["t"], kills.get(pid, s["t"]), s["place"], s["id"], False))
        return holds

    # nightly wall time
    def nightly(self) -> None:
        from tests.conftest import DOIT, TINY, write_project

        path = self.lab_file(None)
        self.up(path)
        projects = self.dir / "projects"
        for name in ("tiny", "tiny2"):
            d = copy.deepcopy(TINY)
            d.update(name=name, targets=list(PLACES), tuning={"trials": 0})
            write_project(projects, d)
        env = dict(os.environ, KILN_LAB=str(path), KILN_PROJECTS=str(projects))

        def night(runner: str, run_id: str) -> subprocess.Popen:
            return self.mh.run_in(runner, [*DOIT, "nightly"], env=dict(env, KILN_RUN_ID=run_id), cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def wall(run_id: str) -> float:
            n = json.loads((self.dir / "build" / "nightly" / run_id / "nightly.json").read_text())
            assert n["exit_code"] == 0, (run_id, [(j["app"], j["board"], j["status"]) for j in n["jobs"]])
            return n["wall_s"]

        night("run1", "warm").wait()  # builds the apps: not timed
        alone, shared, makespan, back = [], [], [], []
        for r in range(self.args.rounds):
            night("run1", f"alone-{r}").wait()
            alone.append(wall(f"alone-{r}"))
            t0 = time.perf_counter()
            ps = [night(h, f"shared-{h}-{r}") for h in ("run1", "run2")]
            for p in ps:
                p.wait()
            makespan.append(time.perf_counter() - t0)
            shared += [wall(f"shared-{h}-{r}") for h in ("run1", "run2")]
            for k in ("a", "b"):  # timed by their own wall_s
                night("run1", f"back-{k}-{r}").wait()
            back.append(wall(f"back-a-{r}") + wall(f"back-b-{r}"))
        self.rows.append(("nightly wall (s): one runner alone", spread(alone)))
        self.rows.append(("nightly wall (s): each of two runners sharing the lab", spread(shared)))
        self.rows.append(("two nights, two runners at once: until both done (s)", spread(makespan)))
        self.rows.append(("two nights, one runner back to back: sum of walls (s)", spread(back)))
        self.rows.append(("ratio: a shared runner's night / a night alone",
                          f"{statistics.median(shared) / statistics.median(alone):.2f}x"))
        self.rows.append(("ratio: two at once / back to back",
                          f"{statistics.median(makespan) / statistics.median(back):.2f}x"))

    def print(self) -> None:
        w = max((len(k) for k, _ in self.rows), default=0)  # no rows when the first phase failed
        print()
        for k, v in self.rows:
            print(f"{k:<{w}}  {v}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(*sys.argv[2:4], int(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default="acquire,expiry,chaos,nightly")
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--ttl", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="acquire, expiry (1 round) and chaos (4 cycles, 2 holders); no nightly phase")
    a = ap.parse_args()
    if a.smoke:
        a.phases, a.rounds, a.cycles, a.workers = "acquire,expiry,chaos", 1, 4, 2
    if os.geteuid() != 0:
        print("bench/lab_chaos.py: needs root (network namespaces)", file=sys.stderr)
        return 2
    b = Bench(a)
    t0 = time.time()
    try:
        for phase in a.phases.split(","):
            print(f"phase {phase} ...", flush=True)
            getattr(b, phase)()
    finally:
        b.mh.down()
        b.print()
        if a.smoke:
            print("\n--smoke: phase nightly not run (two apps built and deployed on four boards, night after "
                  "night: minutes); run without --smoke for it")
        print(f"\n(total {time.time() - t0:.0f} s; lab file copies, logs and chaos.json in {b.dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
