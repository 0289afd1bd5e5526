"""Detection (FOMO-style): targets from boxes, decoding and merging of a heat map, precision /
recall / F1 of centres against hand-computed cases, the host's scoring of a board's outputs,
what the manifest refuses at load (naming the field), the fomo family's counts, a few epochs
that learn on hand-made scenes, and the int8 library of a tiny fomo net bit for bit with its
fake-quant twin on x86-host."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError as PydanticError

from kiln.errors import ValidationError
from kiln.schema import FomoArchitecture, Project, QuantizeSettings
from kiln.tasks import detection as scoring
from passes import tasks
from passes.tasks import detection

APP = {
    "name": "det",
    "requirements": {"f1": {"min": 0.5}},
    "dataset": {"format": "gtsdb", "path": "scenes", "image_size": [64, 64], "classes": [14, 17]},
    "architecture": {"family": "fomo", "alpha": 0.25, "blocks": 4, "head_width": 8},
    "detection": {},
    "training": {"epochs": 1, "lr": 0.01},
    "targets": ["x86-host"],
}


def manifest(**changes) -> dict:
    m = copy.deepcopy(APP)
    for key, value in changes.items():
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    return m


def boxes(*rows, k: int = 4) -> np.ndarray:
    """One image's (k, 5) label rows [class, cx, cy, w, h], padding -1."""
    out = -np.ones((k, 5), np.float32)
    if rows:
        out[: len(rows)] = rows
    return out


# ---------------------------------------------------------------------------------------------
# targets, decoding, matching


def test_each_objects_centroid_cell_holds_its_class_and_torch_agrees():
    y = np.stack([boxes((0, 0.10, 0.10, 0.1, 0.1), (1, 0.99, 0.55, 0.2, 0.2)), boxes(), boxes((1, 0.5, 0.5, 0.3, 0.3))])
    t = scoring.cell_targets(y, (4, 8))
    assert t.shape == (3, 4, 8) and t.dtype == np.int64
    assert t[0, 0, 0] == 1 and t[0, 2, 7] == 2 and (t[0] > 0).sum() == 2  # cx 0.99 -> column 7, cy 0.55 -> row 2
    assert not t[1].any() and t[2, 2, 4] == 2
    rng = np.random.default_rng(0)
    many = rng.uniform(0, 1, size=(20, 6, 5)).astype(np.float32)
    many[..., 0] = rng.integers(-1, 3, size=(20, 6))
    many[many[..., 0] < 0] = -1
    np.testing.assert_array_equal(detection.targets(torch.from_numpy(many), (6, 5)).numpy(),
                                  scoring.cell_targets(many, (6, 5)))


def _map(probs: dict, classes: int = 2, rows: int = 6, cols: int = 6) -> np.ndarray:
    """Logits whose softmax gives class ``c`` probability ``p`` and background 1 - p in cell
    (r, col) for each ``(r, col): (c, p)``; background elsewhere."""
    logits = np.full((classes + 1, rows, cols), -30.0)
    logits[0] = 5.0
    for (r, c), (k, p) in probs.items():
        logits[0, r, c] = np.log(1 - p)
        logits[k + 1, r, c] = np.log(p)
    return logits


def test_peaks_above_the_threshold_merge_within_the_radius_into_one_weighted_centre():
    m = _map({(1, 1): (0, 0.9), (1, 2): (0, 0.6), (4, 4): (0, 0.7), (4, 1): (1, 0.8), (0, 5): (1, 0.3)})
    found = scoring.decode(m, threshold=0.5, radius=1.5)
    # class 0: (1,1) absorbs its neighbour (1,2): x = (1.5*0.9 + 2.5*0.6) / 1.5 = 1.9; (4,4) apart
    assert [(c, round(x, 3), round(y, 3)) for c, x, y, _ in found] == [(0, 1.9, 1.5), (0, 4.5, 4.5), (1, 1.5, 4.5)]
    assert found[0][3] == pytest.approx(0.9)
    assert len(scoring.decode(m, threshold=0.5, radius=0.0)) == 4  # no merging: every cell its own centre
    assert len(scoring.decode(m, threshold=0.25, radius=1.5)) == 4  # (0,5)'s 0.3 now counts
    assert scoring.decode(m, threshold=0.95, radius=1.5) == []


def test_precision_recall_and_f1_against_hand_counted_matches():
    found = [(0, 1.5, 1.5, 0.9), (0, 5.0, 5.0, 0.8), (1, 2.0, 2.0, 0.7)]
    truth = [(0, 1.2, 1.9), (0, 3.0, 3.0), (1, 2.5, 2.5), (1, 9.0, 9.0)]
    counts = scoring.match(found, truth, distance=1.0, classes=2)
    # class 0: (1.5,1.5)-(1.2,1.9) at 0.5 is a TP; (5,5) is 2.8 from (3,3): FP and FN; class 1: one TP, one FN
    np.testing.assert_array_equal(counts, [[1, 1, 1], [1, 0, 1]])
    got = scoring.figures(counts, ["stop", "no_entry"])
    assert (got["tp"], got["fp"], got["fn"]) == (2, 1, 2)
    assert got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(0.5)
    assert got["f1"] == pytest.approx(4 / 7)
    assert got["per_class"]["no_entry"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "tp": 1,
                                            "fp": 0, "fn": 1}
    # each centre matches one object at most, the closest pair first
    np.testing.assert_array_equal(scoring.match([(0, 1.0, 1.0)], [(0, 1.2, 1.0), (0, 0.5, 1.0)], 1.0, 1), [[1, 0, 1]])
    assert scoring.prf(0, 0, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}  # nothing there, nothing found


def test_the_host_scores_a_boards_flat_heat_maps_and_their_agreement():
    s = scoring.Scorer(("a", "b"), (6, 6), 0.5, 1.5, 1.5)
    hit = _map({(1, 1): (0, 0.9)})
    miss = _map({(4, 4): (1, 0.9)})
    labels = [[[0, 1.4 / 6, 1.6 / 6, 0.1, 0.1]], [[1, 0.1, 0.1, 0.1, 0.1]], []]
    runner = {"outputs": [hit.ravel().tolist(), miss.ravel().tolist(), hit.ravel().tolist()], "predictions": [0, 0, 0]}
    req = Project.model_validate(manifest()).requirements
    got, checks = s.quality(req, runner, labels, None)
    assert (got["tp"], got["fp"], got["fn"]) == (1, 2, 1) and got["f1"] == pytest.approx(0.4)
    assert checks == [("f1", pytest.approx(0.4), 0.5, ">=")]
    assert got["agreement_with_reference"] == 1.0 and got["postprocess_ms"] > 0
    other = [hit.ravel().tolist(), hit.ravel().tolist(), hit.ravel().tolist()]
    assert s.quality(req, runner, labels, other)[0]["agreement_with_reference"] == pytest.approx(2 / 3)
    lines = scoring.details({"x86-host": {**got, "latency_ms": {"p50": 1.0}}})
    assert "0.400" in lines[-1] and "x86-host" in lines[-1]
    with pytest.raises(ValidationError, match=r"expected \(images, 108\)"):
        s.quality(req, {"outputs": [[0.0] * 10], "predictions": [0]}, labels, None)
    with pytest.raises(ValidationError, match="no 'outputs'"):
        s.quality(req, {"predictions": [0]}, labels, None)


# ---------------------------------------------------------------------------------------------
# the manifest


def test_a_fomo_net_on_boxes_is_a_detector():
    p = Project.model_validate(manifest())
    assert p.objective == "detection" and p.task.name == "detection" and tasks.of(p) is detection
    assert p.task.threshold == 0.5 and p.task.object_weight == 100.0
    assert detection.output_shape(p, (3, 64, 64)) == (1, 3 * 8 * 8)
    assert detection.loss_weights(p, None) == [1.0, 100.0, 100.0]


@pytest.mark.parametrize("changes, field", [
    ({"requirements": {"accuracy": {"min": 0.5}}}, "requirements.accuracy"),
    ({"requirements": {"mae": {"max": 1.0}}}, "requirements.mae"),
    ({"requirements": {"rmse": {"max": 1.0}}}, "requirements.rmse"),
    ({"requirements": {"auc": {"min": 0.5}}}, "requirements.auc"),
    ({"requirements": {"f1": {"min": 0.5}, "macro_f1": {"min": 0.5}}}, "requirements.macro_f1"),
    ({"training": {"epochs": 1, "lr": 0.01, "class_weights": "balanced"}}, "training.class_weights"),
    ({"detection": None}, "detection: family 'fomo' is a detector"),
    ({"detection": {"threshold": 1.5}}, "detection.threshold"),
    ({"requirements": {"f1": {"min": 1.5}}}, "requirements.f1.min"),
    # a detection data set with a classifier, a detector on class labels
    ({"architecture": {"family": "cnn", "widths": [8], "max_macs": 10**7}, "detection": None,
      "requirements": {"accuracy": {"min": 0.5}}}, "architecture.family: 'cnn'"),
    ({"dataset": {"format": "synthetic", "classes": 2, "image_size": [32, 32]}}, "dataset.format: 'synthetic'"),
    # a classifier asked for a detector's figures
    ({"dataset": {"format": "synthetic", "classes": 2}, "architecture": {"family": "cnn", "widths": [8],
      "max_macs": 10**7}, "detection": None}, "requirements.f1"),
])
def test_a_wrong_field_is_refused_at_load_naming_it(changes, field):
    with pytest.raises(PydanticError) as e:
        Project.model_validate(manifest(**changes))
    assert field in str(e.value)


def test_fomo_counts_match_its_build_and_its_grid_is_an_eighth():
    from kiln.nets import build, estimate, measure

    for arch, size in ((FomoArchitecture(family="fomo"), (96, 128)),
                       (FomoArchitecture(family="fomo", alpha=0.5, blocks=4, head_width=0), (60, 44))):
        model = build(arch, 3, 4, size)
        got, want = measure(model, (3, *size)), estimate(arch, size, 3, 4)
        assert (got.params, got.macs, got.activations) == (want.params, want.macs, want.activations)
        out = model(torch.zeros(1, 3, *size))
        assert out.shape == (1, 5 * scoring.grid(size)[0] * scoring.grid(size)[1])
    assert scoring.grid((60, 44)) == (8, 6)
    # a convolution: a shifted object shifts the map (away from the borders)
    # (cells whose 27-pixel receptive field stays inside the image)
    model = build(FomoArchitecture(family="fomo", blocks=4, head_width=0), 3, 1, (96, 96)).eval()
    x = torch.zeros(1, 3, 96, 96)
    x[:, :, 32:40, 32:40] = 1.0
    with torch.no_grad():
        a = model(x).reshape(2, 12, 12)
        b = model(torch.roll(x, (16, 16), (2, 3))).reshape(2, 12, 12)
    torch.testing.assert_close(a[:, 2:7, 2:7], b[:, 4:9, 4:9], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# training and int8


def _scenes(n: int, seed: int, size: int = 32):
    """Grey noise scenes with 0-2 squares each: class 0 bright, class 1 dark, 6x6 pixels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(90, 160, size=(n, size, size, 3)).astype(np.uint8)
    y = -np.ones((n, 4, 5), np.float32)
    for i in range(n):
        for k in range(rng.integers(0, 3)):
            c = int(rng.integers(0, 2))
            r0, c0 = rng.integers(0, size - 6, size=2)
            x[i, r0 : r0 + 6, c0 : c0 + 6] = 250 if c == 0 else 5
            y[i, k] = (c, (c0 + 3) / size, (r0 + 3) / size, 6 / size, 6 / size)
    return x, y


def _split_dir(root):
    for split, n, seed in (("train", 160, 0), ("val", 32, 1), ("test", 8, 2)):
        x, y = _scenes(n, seed)
        np.savez(root / f"{split}.npz", x=x, y=y)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny fomo net (32x32 input, a 4x4 grid) fitted a few epochs on hand-made scenes by the
    training loop, with its val F1 before and after."""
    from kiln.nets import build
    from passes.support.common import load_split
    from passes.support.training import fit

    p = Project.model_validate(manifest(dataset={**APP["dataset"], "image_size": [32, 32]},
                                        architecture={"family": "fomo", "blocks": 4, "head_width": 8},
                                        detection={"object_weight": 20}))
    data = _split_dir(tmp_path_factory.mktemp("scenes"))
    x, y = detection.fit_split(p, data, "train")
    torch.manual_seed(0)
    model = build(p.architecture, 3, 2, (32, 32))
    xva, yva = load_split(data, "val")
    before = detection.validation(model, xva, yva)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded machine: one thread is ten times faster than two for this tiny net
    try:
        history = fit(model, x, y, epochs=10, batch=16, lr=0.02, aug=p.dataset.augment,
                      gen=torch.Generator().manual_seed(0), xva=xva, yva=yva, keep_best=True, loss="detection",
                      class_weights=detection.loss_weights(p, y))
    finally:
        torch.set_num_threads(threads)
    return {"project": p, "data": data, "model": model, "history": history, "before": before, "y": y}


def test_a_few_epochs_learn_centres_from_boxes(trained):
    from passes.support.common import load_split

    assert trained["y"].shape == (160, 4, 5) and trained["y"].dtype == np.float32  # the boxes, as the split holds them
    best = max(r["val_f1"] for r in trained["history"])
    assert best > 0.6 and best > trained["before"] + 0.3, trained["history"]
    xva, yva = load_split(trained["data"], "val")
    j = detection.judge(trained["project"], xva, yva).measure(trained["model"])
    assert j["val_f1"] == pytest.approx(best) and 0 < j["val_precision"] <= 1


def test_int8_fomo_library_computes_its_twin_bit_for_bit(trained, tmp_path):
    """The trained tiny fomo net quantized (int8), exported to QDQ ONNX and compiled for
    x86-host by the compile stage's own path: the library's heat maps equal the fake-quant
    twin's bit for bit, and so do the decoded centres."""
    import tvm
    from tvm import relax

    from kiln.config import load_board
    from passes import compress, quantize
    from passes.support.common import load_split, to_tensor
    from passes.support.onnx_export import export_model
    from passes.support.tvm_build import compile_onnx

    p, data = trained["project"], trained["data"]
    model = copy.deepcopy(trained["model"]).eval()
    ckpt = {"architecture": p.architecture.model_dump(), "channels": 3, "num_classes": 2, "image_size": [32, 32]}
    ctx = compress.PassContext(p, data, 0, 0, "quantize")
    twin, ckpt = quantize.run(model, ckpt, QuantizeSettings(mode="int8", calibration="minmax"), ctx)
    export_model(model, ckpt, data, tmp_path / "q.onnx", tmp_path / "q.json")
    x = to_tensor(load_split(data, "val")[0][:12])
    with torch.no_grad():
        ref = twin(x).numpy()
    so = tmp_path / "model.so"
    compile_onnx(load_board("x86-host"), tmp_path / "q.onnx", [1, 3, 32, 32], so, tmp_path / "compile.json")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())
    got = np.concatenate([vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x[i : i + 1].numpy()))).numpy()
                          for i in range(len(x))])
    assert got.shape == (12, 3 * 4 * 4) and len(np.unique(ref)) > 10  # a map, not a constant
    np.testing.assert_array_equal(got, ref)
    s = scoring.Scorer(("a", "b"), (4, 4), 0.5, 1.5, 1.5)
    found = s.detect(got)
    assert found == s.detect(ref) and sum(map(len, found)) > 0


def test_the_nightly_carries_a_detectors_figures_and_flags_a_falling_f1():
    from hil import history, nightly
    from hil.reports import html, schema

    lat = {k: 0.1 for k in ("p50", "p90", "p99", "mean", "min", "max")}
    s = scoring.Scorer(("a", "b"), (6, 6), 0.5, 1.5, 1.5)
    runner = {"outputs": [_map({(1, 1): (0, 0.9)}).ravel().tolist()], "predictions": [0]}
    got, _ = s.quality(Project.model_validate(manifest()).requirements, runner, [[[0, 0.25, 0.25, 0.1, 0.1]]], None)
    result = {**got, "latency_ms": lat, "model_bytes": 1000, "memory_kb": None, "latency_emulated": False}
    m = nightly.metrics({"runner": {}}, result)
    assert (m["f1"], m["precision"], m["recall"]) == (1.0, 1.0, 1.0) and m["per_class"] is None
    schema.METRICS(m, "metrics", "a night")  # the kiln-nightly/1 contract takes them
    job = {"app": "signs", "board": "x86-host", "status": "pass", "flaky": False, "metrics": m,
           "requirements": [{"name": "f1", "measured": 1.0, "op": ">=", "limit": 0.5, "verdict": "pass"}]}
    assert "F1 1.000" in html._cell(job)
    assert history.job_metrics(job)["f1"] == 1.0
    assert history.judge("f1", 0.80, [0.9] * 5)["flagged"]  # lower is worse
    assert not history.judge("f1", 0.95, [0.9] * 5)["flagged"]


def test_the_detection_settings_are_in_the_recorded_configuration_of_train_compress_and_deploy():
    """Changing detection.threshold (or the radius, match distance, object weight) reruns the
    stages that judge or score by it; a classifier's recorded configuration has no such key."""
    from types import SimpleNamespace

    from passes.pipeline import PIPELINE

    stages = {s.name: s for s in PIPELINE}
    for m in (manifest(), manifest(detection={"threshold": 0.7})):
        u = SimpleNamespace(p=Project.model_validate(m), app=SimpleNamespace(instances=[], boards={}))
        for name in ("train", "compress", "deploy"):
            assert stages[name].config(u)["detection"] == u.p.detection.model_dump()
    classifier = manifest(dataset={"format": "synthetic", "classes": 2}, detection=None,
                          architecture={"family": "cnn", "widths": [8], "max_macs": 10**7},
                          requirements={"accuracy": {"min": 0.5}})
    u = SimpleNamespace(p=Project.model_validate(classifier), app=SimpleNamespace(instances=[], boards={}))
    assert all("detection" not in stages[n].config(u) for n in ("train", "compress", "deploy"))
