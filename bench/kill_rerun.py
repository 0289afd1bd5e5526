"""How long a rerun takes after a build is killed with -9 during its last compile.

    .venv/bin/python bench/kill_rerun.py REPO WORKDIR

Builds the tests' tiny app (8 tuning trials, one local x86-host board) with REPO's dodo.py in
WORKDIR, kills `doit deploy:tiny` (its whole process group, SIGKILL) when `compile:tiny@x86-host`
starts, then times the rerun and lists the tasks it executed. Run it on two checkouts (e.g. a
clone of an older commit) to compare.
"""
import copy, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import yaml
repo, work = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(repo))
from tests.conftest import TINY
shutil.rmtree(work, ignore_errors=True); (work / "projects" / "tiny").mkdir(parents=True)
d = copy.deepcopy(TINY); d["tuning"] = {"trials": 8}
(work / "projects" / "tiny" / "project.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
(work / "lab.yaml").write_text(yaml.safe_dump({"name": "desk", "boards": [{"name": "x86-host", "type": "x86-host", "transport": {"kind": "local"}}]}))
env = dict(os.environ, KILN_LAB=str(work / "lab.yaml"), KILN_PROJECTS=str(work / "projects"), KILN_BUILD=str(work / "build"), PYTHONUNBUFFERED="1")
cmd = [str(repo / ".venv/bin/doit") if (repo / ".venv").exists() else "/work/main/.venv/bin/doit", "deploy:tiny"]
p = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
t0 = time.time()
for line in p.stdout:
    if line.startswith(".  compile:tiny@x86-host"):
        os.killpg(p.pid, signal.SIGKILL); break
p.wait(); print(f"first run killed at compile after {time.time() - t0:.1f} s")
t0 = time.time()
r = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True)
dt = time.time() - t0
print("rerun rc", r.returncode, f"{dt:.1f} s; executed:", [l[3:] for l in r.stdout.splitlines() if l.startswith(".  ")])
print("cd", repo, "&& KILN_LAB=... KILN_PROJECTS=... KILN_BUILD=...", " ".join(cmd))
