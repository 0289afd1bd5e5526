"""How long a rerun takes after a build is killed with -9 during its last compile.

    .venv/bin/python bench/kill_rerun.py REPO WORKDIR
    .venv/bin/python bench/kill_rerun.py --smoke     # this checkout, a temporary WORKDIR, 0 trials

Builds the tests' tiny app (8 tuning trials, one local x86-host board) with REPO's dodo.py in
WORKDIR, kills `doit deploy:tiny` (its whole process group, SIGKILL) when `compile:tiny@x86-host`
starts, then times the rerun and lists the tasks it executed. Run it on two checkouts (e.g. a
clone of an older commit) to compare. ``--smoke`` tunes nothing (a minute; numbers meaningless).
"""
import argparse, copy, os, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path
import yaml
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("repo", nargs="?", type=Path)
ap.add_argument("work", nargs="?", type=Path)
ap.add_argument("--smoke", action="store_true", help="REPO this checkout, WORKDIR temporary, 0 tuning trials")
a = ap.parse_args()
if a.smoke:
    a.repo = a.repo or Path(__file__).resolve().parent.parent
    a.work = a.work or Path(tempfile.mkdtemp(prefix="kiln-kill-rerun-"))
elif a.repo is None or a.work is None:
    ap.error("REPO and WORKDIR are required (or --smoke)")
repo, work = a.repo.resolve(), a.work.resolve()
sys.path.insert(0, str(repo))
from tests.conftest import TINY
shutil.rmtree(work, ignore_errors=True); (work / "projects" / "tiny").mkdir(parents=True)
d = copy.deepcopy(TINY); d["tuning"] = {"trials": 0 if a.smoke else 8}
(work / "projects" / "tiny" / "project.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
(work / "lab.yaml").write_text(yaml.safe_dump({"name": "desk", "boards": [{"name": "x86-host", "type": "x86-host", "transport": {"kind": "local"}}]}))
env = dict(os.environ, KILN_LAB=str(work / "lab.yaml"), KILN_PROJECTS=str(work / "projects"), KILN_BUILD=str(work / "build"), PYTHONUNBUFFERED="1")
cmd = [str(repo / ".venv/bin/doit") if (repo / ".venv").exists() else "/work/main/.venv/bin/doit", "deploy:tiny"]
p = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
t0 = time.time()
killed, tail = False, []
for line in p.stdout:
    tail = (tail + [line])[-30:]
    if line.startswith(".  compile:tiny@x86-host"):
        os.killpg(p.pid, signal.SIGKILL); killed = True; break
p.wait()
if not killed:
    sys.exit(f"doit deploy:tiny ended (rc {p.returncode}) before compile:tiny@x86-host started:\n{''.join(tail)}")
print(f"first run killed at compile after {time.time() - t0:.1f} s")
t0 = time.time()
r = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True)
dt = time.time() - t0
print("rerun rc", r.returncode, f"{dt:.1f} s; executed:", [l[3:] for l in r.stdout.splitlines() if l.startswith(".  ")])
if r.returncode:
    print(r.stdout[-3000:], r.stderr[-3000:], sep="\n", file=sys.stderr)
print("cd", repo, "&& KILN_LAB=... KILN_PROJECTS=... KILN_BUILD=...", " ".join(cmd))
if a.smoke:
    shutil.rmtree(work, ignore_errors=True)
sys.exit(1 if r.returncode else 0)
