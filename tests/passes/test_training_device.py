"""training.device, the DataLoader loop and training.warm_start (issue 27): a device torch does
not have is refused at load naming the field; training from memory-mapped splits equals training
in memory (same seed, same weights, bit for bit), with and without a background loader worker;
only a data change warm-starts, and a rerun on the same data trains from scratch."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tests.conftest import TINY, write_project
from tests.passes.conftest import layout_at, small_manifest, small_project, write_splits


@pytest.mark.parametrize("device, expect", [
    ("tpu", "expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("cuda:x", "expected auto, cpu, cuda or cuda:N"),
    ("cuda", "torch sees no CUDA device on this machine"),
    ("cuda:7", "torch sees"),
])
def test_a_device_torch_does_not_have_is_refused_at_load(kiln_env, device, expect):
    import torch

    from kiln.config import load_project
    from kiln.errors import ManifestError

    if device.startswith("cuda") and ":" not in device and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 'cuda' is valid here")
    data = copy.deepcopy(TINY)
    data["training"]["device"] = device
    write_project(kiln_env["projects"], data)
    with pytest.raises(ManifestError) as e:
        load_project("tiny")
    assert "field 'training.device'" in str(e.value) and expect in str(e.value), str(e.value)


def test_distributed_across_machines_needs_a_rendezvous(kiln_env):
    from kiln.config import load_project
    from kiln.errors import ManifestError

    data = copy.deepcopy(TINY)
    data["training"]["distributed"] = {"nproc_per_node": 1, "nnodes": 2}
    write_project(kiln_env["projects"], data)
    with pytest.raises(ManifestError, match=r"field 'training.distributed'.*rdzv_endpoint: required"):
        load_project("tiny")


def _fit(x, y, val, workers: int, device: str = "cpu", epochs: int = 2):
    import torch

    from kiln.nets import build
    from passes.support.training import fit

    p = small_project()
    torch.manual_seed(0)
    model = build(p.architecture, 1, 10, (8, 8))
    gen = torch.Generator().manual_seed(0)
    history = fit(model, x, y, epochs=epochs, batch=32, lr=0.01, aug=p.dataset.augment, gen=gen, xva=val["x"],
                  yva=val["y"], keep_best=True, recipe=p.training, device=device, workers=workers)
    return model, history


def test_memory_mapped_training_equals_in_memory_training(tmp_path):
    """The same seed gives the same weights, bit for bit, whether the samples are an in-memory
    array or a np.memmap of the same rows, read in the loop or by a background worker (batches
    and augmentation are drawn in the main process)."""
    import torch

    write_splits(tmp_path, n=96)
    with np.load(tmp_path / "train.npz") as z:
        x, y = z["x"], z["y"]
    val = dict(np.load(tmp_path / "val.npz"))
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap)
    ref, h_ref = _fit(x, y, val, workers=0)
    for xs, workers in ((mm, 0), (mm, 1)):
        model, history = _fit(xs, y, val, workers=workers)
        for k, v in ref.state_dict().items():
            assert torch.equal(v, model.state_dict()[k]), (k, workers)
        assert [r["loss"] for r in history] == [r["loss"] for r in h_ref]


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="no CUDA device on this machine")
def test_cuda_with_mixed_precision_matches_cpu_within_noise(tmp_path):
    write_splits(tmp_path, n=400)
    with np.load(tmp_path / "train.npz") as z:
        x, y = z["x"], z["y"]
    val = dict(np.load(tmp_path / "val.npz"))
    _, cpu = _fit(x, y, val, workers=0, epochs=4)
    model, cuda = _fit(x, y, val, workers=1, device="cuda", epochs=4)
    assert next(model.parameters()).device.type == "cpu"  # the model ends on the CPU
    assert abs(max(r["val_accuracy"] for r in cuda) - max(r["val_accuracy"] for r in cpu)) <= 0.1, (cpu, cuda)


def test_only_a_data_change_warm_starts(tmp_path):
    """warm_start: a data change fine-tunes the last model for warm_start epochs (metrics say
    from which data); a rerun on unchanged data (``doit forget train:<app>``) and a settings
    change train from scratch."""
    from kiln.schema import Project
    from passes import train

    lay = layout_at(tmp_path)
    lay.data.mkdir(parents=True)
    write_splits(lay.data, n=200)
    data = small_manifest()
    data["training"]["warm_start"] = 1
    project = Project.model_validate(data)
    first = train.run(project, lay)
    assert first["start"] == "trained from scratch" and first["warm_start"] is None
    with np.load(lay.split("train")) as z:  # 20 samples more
        x, y = z["x"], z["y"]
    np.savez(lay.split("train"), x=np.concatenate([x, x[:20]]), y=np.concatenate([y, y[:20]]))
    warm = train.run(project, lay)
    assert warm["start"] == f"warm start from {first['trained_on']['data'][:12]} for 1 epochs", warm["start"]
    assert warm["warm_start"] == {"from": first["trained_on"]["data"], "epochs": 1}
    assert len(warm["history"]) == 1 and warm["trained_on"]["data"] != first["trained_on"]["data"]
    assert warm["val_accuracy"] >= first["val_accuracy"] - 0.1  # fine-tuned, not restarted from random
    again = train.run(project, lay)  # same data: the rerun was asked for
    assert again["start"] == "trained from scratch" and len(again["history"]) == 4
    with np.load(lay.split("train")) as z:
        np.savez(lay.split("train"), x=z["x"][:-20], y=z["y"][:-20])
    data["training"]["lr"] = 0.02  # the settings changed too
    other = train.run(Project.model_validate(data), lay)
    assert other["start"] == "trained from scratch"
