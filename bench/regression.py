"""Kiln's regressor on real data, beside plain scikit-learn on the same split.

    .venv/bin/python bench/regression.py [--smoke] [--epochs N]

scikit-learn's diabetes table (442 patients, 10 features, the disease progression a year on:
the wheel ships it) is written as a team's CSV with a numeric label column and declared as the
app of tests/test_regression_app.py (an MLP of widths 32, 16 on standardized targets, MSE, int8).
Kiln runs its data, train and compress stages (`doit compress:diabetes` in a scratch build);
the float model's test figures come from metrics.json, the int8 model's from the compressed
checkpoint's fake-quant twin (what the kernel library computes). The baselines are fitted on the
data stage's own train split (the same features, normalized by Kiln's front end) and scored on
its test split: predicting the training mean, ridge regression (RidgeCV) and gradient boosting
(GradientBoostingRegressor, scikit-learn's defaults). ``--smoke``: 3 epochs, no compression.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_regression_app import diabetes_app, diabetes_csv  # noqa: E402


def _doit(work: Path, manifest: dict, task: str) -> None:
    import yaml

    projects, build = work / "projects", work / "build"
    (projects / manifest["name"]).mkdir(parents=True, exist_ok=True)
    (projects / manifest["name"] / "project.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    env = {**os.environ, "KILN_PROJECTS": str(projects), "KILN_BUILD": str(build), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(ROOT),
                        f"{task}:{manifest['name']}"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"doit {task} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _split(data: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(data / f"{name}.npz") as z:
        return z["x"].reshape(len(z["x"]), -1), z["y"]


def _int8_test(app: Path, data: Path, target: dict) -> dict:
    """The int8 model's test figures: the compressed checkpoint's fake-quant twin."""
    from kiln.tasks.regression import figures
    from passes.support.common import load_checkpoint
    from passes.support.int8 import fake_quant
    from passes.tasks.regression import predict

    model, ckpt = load_checkpoint(app / "compressed.pt")
    if ckpt.get("quantization"):
        model = fake_quant(model, ckpt["quantization"])
    with np.load(data / "test.npz") as z:
        return figures(z["y"], predict(model, z["x"], target))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="3 epochs, no compression (seconds)")
    ap.add_argument("--epochs", type=int, default=None, help="Kiln's training epochs (default: the test app's)")
    args = ap.parse_args()
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import RidgeCV

    from kiln.tasks.regression import figures

    work = Path(os.environ.get("KILN_BENCH_SMOKE_DIR") or tempfile.mkdtemp(prefix="kiln-bench-regression-"))
    work = Path(tempfile.mkdtemp(prefix="regression-", dir=work))
    manifest = diabetes_app(diabetes_csv(work / "diabetes.csv"), epochs=3 if args.smoke else (args.epochs or 20))
    if args.smoke:
        manifest = copy.deepcopy(manifest)
        manifest["compression"]["passes"] = []
    t0 = time.perf_counter()
    _doit(work, manifest, "train" if args.smoke else "compress")
    kiln_s = time.perf_counter() - t0
    app = work / "build" / manifest["name"]
    data = app / "data"
    metrics = json.loads((app / "metrics.json").read_text())
    target = json.loads((data / "data.json").read_text())["target"]
    (xtr, ytr), (xva, yva), (xte, yte) = (_split(data, s) for s in ("train", "val", "test"))
    rows = [("Kiln MLP 32-16, float (metrics.json)", {k: metrics[f"test_{k}"] for k in ("mae", "rmse", "r2")}, kiln_s)]
    if not args.smoke:
        rows.append(("Kiln MLP 32-16, int8 (compressed twin)", _int8_test(app, data, target), None))
    rows.append(("predict the training mean", figures(yte, np.full(len(yte), ytr.mean())), 0.0))
    for name, est in (("scikit-learn RidgeCV", RidgeCV(alphas=np.logspace(-3, 3, 13))),
                      ("scikit-learn GradientBoostingRegressor",
                       GradientBoostingRegressor(random_state=0, n_estimators=20 if args.smoke else 100))):
        t = time.perf_counter()
        est.fit(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))  # the baselines get train + val
        rows.append((name, figures(yte, est.predict(xte)), time.perf_counter() - t))
    print(f"diabetes (scikit-learn, 442 rows): train {len(ytr)}, val {len(yva)}, test {len(yte)} "
          f"(Kiln's split, seed 0); target mean {target['mean']:.1f}, std {target['std']:.1f} (train split)")
    print("\n| model | test MAE | test RMSE | test R2 | fit s |\n|---|---|---|---|---|")
    for name, f, s in rows:
        print(f"| {name} | {f['mae']:.2f} | {f['rmse']:.2f} | {f['r2']:.3f} | {'-' if s is None else f'{s:.1f}'} |")
    if args.smoke:
        print("\n--smoke: 3 epochs, no int8 row (compression not run)")


if __name__ == "__main__":
    main()
