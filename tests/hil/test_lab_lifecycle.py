"""The emulated lab's lifecycle across processes: holders (two deploys at once share one lab),
a killed deploy (its lab adopted and stopped, its run dirs removed), Ctrl-C, and a manifest
asking for more samples than the test set has.

Everything is real: each lab is a real sshd in a ``kiln-lc…`` network namespace (as root) and a
real socat pty, the deploys are real ``doit`` subprocesses. Board names carry a random tag, so
the machine-wide namespace names never collide with another test's lab.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import DOIT, ROOT, TINY, run_doit, write_project

pytestmark = pytest.mark.slow


# -- a lab of its own ---------------------------------------------------------------------------

def make_lab(root: Path) -> dict:
    """An emulated lab (one SSH board of type x86-host, one serial board) in its own build dir."""
    tag = uuid.uuid4().hex[:6]
    ssh, tty = f"lc{tag}-ssh", f"lc{tag}-tty"
    lab = root / "lab.yaml"
    lab.write_text(yaml.safe_dump({"backend": "emulated", "name": f"lc{tag}", "boards": [
        {"name": ssh, "type": "x86-host", "transport": {"kind": "ssh"}},
        {"name": tty, "type": "rpi3", "transport": {"kind": "serial"}, "emulated": True}]}))
    build = root / "build"
    env = dict(os.environ, KILN_PROJECTS=str(root / "projects"), KILN_BUILD=str(build), KILN_LAB=str(lab),
               PYTHONPATH=str(ROOT))
    return {"lab": lab, "build": build, "state": build / "lab", "ssh": ssh, "tty": tty, "env": env}


def lab_processes(state: Path) -> list[psutil.Process]:
    """Live processes of the lab in ``state``: sshd and its sessions (their command line names
    the state dir), socat and the serial board's shell (cwd in the state dir)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            if str(state) in " ".join(p.cmdline()) or str(state) in p.cwd():
                found.append(p)
        except psutil.Error:
            continue
    return found


def namespaces(lab: dict) -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    from hil.emulator.sshd import netns_name

    return {line.split()[0] for line in out.splitlines() if line.strip()} & {netns_name(lab["state"], lab["ssh"])}


def assert_lab_gone(lab: dict, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (lab_processes(lab["state"]) or namespaces(lab)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(p.pid, p.name()) for p in lab_processes(lab["state"])]
    assert not left, f"lab processes still running: {left}"
    if os.geteuid() == 0:
        assert not namespaces(lab), "network namespaces of the lab left behind"
    assert not (lab["state"] / "state.json").exists()


def assert_lab_up(lab: dict) -> None:
    names = {p.name() for p in lab_processes(lab["state"])}
    assert "sshd" in names and "socat" in names, names


@pytest.fixture
def lab(tmp_path):
    lab = make_lab(tmp_path)
    yield lab
    stop_by_hand(lab)


def stop_by_hand(lab: dict) -> None:
    subprocess.run([sys.executable, "-m", "hil.emulator.lab", "down"], env=lab["env"], cwd=ROOT,
                   capture_output=True, timeout=60)


# -- holders, driven through hil.lab from processes of their own ------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from hil.lab import open_lab, close_opened
    from hil.transport import open_transport
    from kiln.config import load_inventory

    inv = open_lab(Path(sys.argv[1]))
    print("open", flush=True)
    for line in sys.stdin:
        if line.strip() == "check":  # run a command on the SSH board
            try:
                board = next(b for b in load_inventory(inv).boards if b.link == "ssh")
                with open_transport(board, inv.parent, inv.parent / "local") as t:
                    print("ok" if t.run(["true"], timeout=10).returncode == 0 else "bad", flush=True)
            except Exception as e:
                print("failed", type(e).__name__, str(e).replace(chr(10), " "), flush=True)
        elif line.strip() == "close":
            close_opened()
            print("closed", flush=True)
            break
""")


class Holder:
    """A process that opens the lab through hil.lab (as a deploy's hil task does)."""

    def __init__(self, lab: dict):
        self.p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lab["lab"])], env=lab["env"], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "open"

    def ask(self, what: str) -> str:
        self.p.stdin.write(what + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> None:
        assert self.ask("close") == "closed"
        self.p.wait(timeout=30)


def test_lab_stays_up_until_the_last_holder_hands_it_back(lab):
    first = Holder(lab)  # starts the lab
    second = Holder(lab)  # finds it up
    assert_lab_up(lab)
    first.close()  # the one that started it ends first
    assert second.ask("check") == "ok"  # the other's board is still there
    assert_lab_up(lab)
    second.close()  # the last holder: the lab stops
    assert_lab_gone(lab)


def test_lab_of_a_holder_killed_with_sigkill_is_adopted_and_stopped(lab):
    killed = Holder(lab)
    killed.p.kill()
    killed.p.wait()
    time.sleep(0.5)
    assert_lab_up(lab)  # kill -9 ran no teardown: the lab is still running
    nxt = Holder(lab)
    assert nxt.ask("check") == "ok"
    nxt.close()  # adopted: the next holder stops it
    assert_lab_gone(lab)


def test_lab_started_by_hand_outlives_every_deploy(lab):
    deploy = Holder(lab)  # a deploy starts the lab, then the user starts it by hand too
    up = subprocess.run([sys.executable, "-m", "hil.emulator.lab", "up", str(lab["lab"])], env=lab["env"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    deploy.close()
    assert_lab_up(lab)
    other = Holder(lab)
    assert other.ask("check") == "ok"
    other.close()
    assert_lab_up(lab)  # started by hand: stays up until lab_down
    status = subprocess.run([sys.executable, "-m", "hil.emulator.lab", "status"], env=lab["env"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60).stdout
    assert status.startswith("up (held by hand"), status
    stop_by_hand(lab)
    assert_lab_gone(lab)


# -- real deploys (doit) of one tiny app built once for this module ---------------------------

@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A tiny app (x86-host only) built and deployed once; tests rerun only its hil/deploy tasks."""
    root = tmp_path_factory.mktemp("lifecycle")
    lab = make_lab(root)
    data = copy.deepcopy(TINY)
    write_project(root / "projects", data)
    p = run_doit(lab["env"], "deploy:tiny")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert_lab_gone(lab)
    app_build = lab["build"] / "tiny"
    lat = sorted(json.loads((app_build / "last" / f"{lab['ssh']}.json").read_text())["runner"]["latencies_us"])
    lab.update(app=app_build, project=data, root=root, latency_us=lat[len(lat) // 2],
               workdir=lab["state"] / lab["ssh"] / "work")
    yield lab
    stop_by_hand(lab)


def set_validation(app: dict, run_s: float = 0.0, **fields) -> None:
    """Rewrite the manifest's validation (a runner that warms up for about ``run_s`` seconds) and
    forget the last runs, so that the next doit deploys again (nothing else is rebuilt)."""
    data = copy.deepcopy(app["project"])
    data["validation"].update(fields)
    data["validation"]["warmup"] = max(1, int(run_s * 1e6 / app["latency_us"]))
    write_project(app["root"] / "projects", data)
    for f in (app["app"] / "last").glob("*.json"):
        f.unlink()


def start_doit(app: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([*DOIT, "deploy:tiny"], env=app["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def runner_of(app: dict, pid: int, timeout: float = 180.0) -> psutil.Process:
    """Wait until the deploy of doit process ``pid`` runs its runner on the SSH board."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.process_iter(["name"]):
            try:
                if p.info["name"] == "kiln-runner" and str(pid) in Path(p.cwd()).name.split("-"):
                    return p
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise AssertionError(f"the deploy of pid {pid} never ran its runner on the board")


def run_json(app: dict, pid: int | None = None) -> dict:
    """The SSH board's run.json of doit process ``pid``'s run (run ids end in the pid), or of
    the last report's run."""
    if pid is None:
        run_id = json.loads((app["app"] / "report.json").read_text())["run_id"]
    else:
        run_id = next(d.name for d in (app["app"] / "runs").iterdir() if d.name.endswith(f"-{pid}"))
    return json.loads((app["app"] / "runs" / run_id / app["ssh"] / "run.json").read_text())


def waits_on_a_task_lock(app: dict, pid: int, timeout: float = 180.0) -> str:
    """Wait until doit process ``pid`` holds a task lock file of the build open (kiln.actions: one
    doit process at a time runs a task); its name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            held = [Path(f.path).name for f in psutil.Process(pid).open_files() if "/.locks/" in f.path]
        except psutil.Error:
            held = []
        if held:
            return held[0]
        time.sleep(0.05)
    raise AssertionError(f"doit process {pid} never took a task lock")


def test_two_deploys_at_once_share_the_lab(app):
    set_validation(app, run_s=2)
    first = start_doit(app)  # starts the lab
    runner_of(app, first.pid)
    first.send_signal(signal.SIGSTOP)  # held mid-deploy, its runner on the board
    try:
        set_validation(app, run_s=25)
        second = start_doit(app)
        # the same board's hil task of the same app: the second waits for the first's to end
        # (kiln.actions runs a task in one doit process at a time), then runs its own
        assert waits_on_a_task_lock(app, second.pid).startswith("hil")
    finally:
        first.send_signal(signal.SIGCONT)
    runner_of(app, second.pid)
    out1, err1 = first.communicate(timeout=180)  # the first ends and leaves the lab to the second
    assert first.returncode == 0, out1[-2000:] + err1[-3000:]
    assert f"left up for the deploy(s) still holding it (pid {second.pid})" in err1, err1[-3000:]
    out2, err2 = second.communicate(timeout=300)
    assert second.returncode == 0, out2[-2000:] + err2[-3000:]
    assert "EOFError" not in err2 and "PASSED" in out2
    assert "another doit process in this build is running it; waiting for it" in err2
    for p in (first, second):
        rec = run_json(app, p.pid)
        assert "error" not in rec and rec["runner"]["count"] == 24, rec.get("error")
    assert_lab_gone(app)  # the last one stopped it


def test_killed_deploy_leaves_nothing_behind(app):
    set_validation(app, run_s=20)
    killed = start_doit(app)
    runner_of(app, killed.pid)
    killed.kill()  # kill -9: no teardown, no cleanup on the board
    killed.wait()
    assert_lab_up(app)
    left = [d.name for d in (app["workdir"] / "runs").iterdir() if str(killed.pid) in d.name.split("-")]
    assert left, "the killed deploy's run dir should be on the board"
    set_validation(app, run_s=0)
    p = run_doit(app["env"], "deploy:tiny")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "error" not in run_json(app)
    assert_lab_gone(app)  # the next deploy adopted the lab and stopped it
    assert not list((app["workdir"] / "runs").iterdir())  # and removed the killed run's dir


def test_samples_beyond_the_test_set_warn_and_are_recorded(app):
    available = json.loads((app["app"] / "data" / "data.json").read_text())["test_inputs"]["shape"][0]
    set_validation(app, samples=100_000)
    p = run_doit(app["env"], "deploy:tiny")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    warning = [line for line in p.stderr.splitlines() if "validation.samples" in line]
    assert len(warning) == 1, p.stderr[-3000:]
    assert "'tiny'" in warning[0] and "100000" in warning[0] and f"only {available}" in warning[0]
    rec = run_json(app)
    assert (rec["samples_requested"], rec["samples_sent"], rec["runner"]["count"]) == (100_000, available, available)
    # within the test set: recorded, no warning
    set_validation(app, samples=10)
    p = run_doit(app["env"], "deploy:tiny")
    assert p.returncode == 0 and "validation.samples" not in p.stderr
    rec = run_json(app)
    assert (rec["samples_requested"], rec["samples_sent"], rec["runner"]["count"]) == (10, 10, 10)


def test_ctrl_c_during_a_deploy_ends_it_with_one_line(app):
    set_validation(app, run_s=30)
    # its own process group, as a shell's job; ^C reaching it as in a terminal: a suite run as a
    # background job of a non-interactive shell (CI, `make test &`) inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler in doit at all
    p = start_doit(app, start_new_session=True,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runner_of(app, p.pid)
    t0 = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)  # what ^C in the terminal does: the whole foreground group
    out, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("kiln: interrupted")]
    assert said == [f"kiln: interrupted during hil:tiny@{app['ssh']}"], err[-2000:]
    assert p.returncode == 130
    # nothing of the interrupted board reads as complete; the lab went with the teardown
    assert not (app["app"] / "last" / f"{app['ssh']}.json").exists()
    assert not (app["app"] / "report.json").exists()
    assert not list((app["app"] / "runs").glob(f"*-{p.pid}/{app['ssh']}/run.json"))
    assert_lab_gone(app)
    assert not list((app["workdir"] / "runs").iterdir())  # its run dir was removed on the board
