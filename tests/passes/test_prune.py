"""The prune pass: structured pruning removes channels for real, magnitude pruning leaves exact
zeros at the requested sparsity, runs repeat exactly, bad settings name their field when the
manifest loads."""

from __future__ import annotations

import copy

import pytest
import torch

from kiln.config import load_project
from kiln.errors import ManifestError
from kiln.nets import build, measure
from kiln.schema import PruneSettings, parse_architecture
from passes import compress, prune
from passes.support.common import load_checkpoint, rebuild, save_checkpoint, weight_layers
from tests.conftest import write_project
from tests.passes.conftest import randomize_bn, small_manifest


def ctx(project, data):
    return compress.PassContext(project, data, project.training.seed, 0, "prune")


def settings(**s) -> PruneSettings:
    return PruneSettings.model_validate(s)


@pytest.mark.parametrize("head", ["gap", "flatten"])
def test_pruned_cnn_computes_what_the_masked_model_computes(head):
    torch.manual_seed(0)
    arch = {"family": "cnn", "widths": [6, 10, 12], "head": head, "max_macs": 10**9}
    ckpt = {"architecture": arch, "channels": 3, "num_classes": 5, "image_size": [16, 16]}
    model = build(parse_architecture(arch), 3, 5, (16, 16))
    randomize_bn(model)
    model.eval()
    original = copy.deepcopy(model)
    x = torch.rand(4, 3, 16, 16)
    removed = prune.Structured(model, x, amount=0.5, steps=1).step()
    # the original with the removed channels' readers zeroed computes what the pruned model does
    masked = copy.deepcopy(original)
    with torch.no_grad():
        for members in removed:
            prune.mask_inputs(masked, members)
        assert torch.allclose(model(x), masked(x), atol=1e-5)
        assert not torch.allclose(original(x), masked(x), atol=1e-3)  # something was removed
    big, little = measure(original, (3, 16, 16)), measure(model, (3, 16, 16))
    assert little.params < big.params and little.macs < big.macs
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == [3, 5, 6]
    assert model[-1].out_features == 5  # the classifier keeps its classes
    # the checkpoint with the narrowed widths rebuilds the same model
    again = rebuild(dict(ckpt, architecture=dict(arch, widths=[3, 5, 6]), state_dict=model.state_dict()))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_filters_kept_are_those_of_largest_folded_l1_norm():
    arch = parse_architecture({"family": "cnn", "widths": [4], "max_macs": 10**9})
    model = build(arch, 1, 2, (4, 4)).eval()
    with torch.no_grad():
        conv = model[0]
        conv.weight.copy_(torch.tensor([1.0, 4.0, 2.0, 3.0])[:, None, None, None].expand_as(conv.weight))
        model[1].weight.copy_(torch.tensor([1.0, 1.0, 4.0, 1.0]))  # BN scale: filter 2 counts 8
    prune.Structured(model, torch.rand(2, 1, 4, 4), amount=0.5, steps=1).step()
    assert model[0].weight[:, 0, 0, 0].tolist() == [4.0, 2.0]  # filters 1 and 2 kept, in order
    assert model[1].weight.tolist() == [1.0, 4.0]


def test_structured_pass_removes_channels_and_the_checkpoint_round_trips(small_trained, tmp_path):
    project, data, model_pt = small_trained
    model, ckpt = load_checkpoint(model_pt)
    before = measure(model, (1, 8, 8))
    pruned, out = prune.run(model, ckpt, settings(method="structured", amount=0.5, steps=2, finetune_epochs=1),
                            ctx(project, data))
    assert out["architecture"]["widths"] == [4, 8] and ckpt["architecture"]["widths"] == [8, 16]
    after = measure(pruned, (1, 8, 8))
    assert after.params < before.params / 2 and after.macs < before.macs / 2
    assert [r["widths"] for r in out["pruning"][0]["rounds"]] == [[6, 12], [4, 8]]
    save_checkpoint(tmp_path / "c.pt", dict(out, state_dict=pruned.state_dict()))
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_pruning_leaves_exact_zeros_at_the_requested_sparsity(small_trained, scope):
    project, data, model_pt = small_trained
    model, ckpt = load_checkpoint(model_pt)
    pruned, out = prune.run(model, ckpt, settings(method="magnitude", scope=scope, amount=0.7, steps=2,
                                                  finetune_epochs=1), ctx(project, data))
    assert out["architecture"]["widths"] == [8, 16]  # same shape, zeros inside
    layers = [m.weight for _, m in weight_layers(pruned)]
    zeros = [int((w == 0).sum()) for w in layers]
    if scope == "layer":
        assert zeros == [round(0.7 * w.numel()) for w in layers]
    else:
        total = sum(w.numel() for w in layers)
        assert sum(zeros) == round(0.7 * total) and len(set(z / w.numel() for z, w in zip(zeros, layers))) > 1
    assert out["pruning"][0]["rounds"][-1]["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_pruning_is_deterministic(small_trained):
    project, data, model_pt = small_trained
    runs = []
    for _ in range(2):
        model, ckpt = load_checkpoint(model_pt)
        pruned, _ = prune.run(model, ckpt, settings(method="structured", amount=0.4, finetune_epochs=1), ctx(project, data))
        runs.append(pruned.state_dict())
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_earlier_zeros_survive_a_structured_pass(small_trained):
    project, data, model_pt = small_trained
    model, ckpt = load_checkpoint(model_pt)
    model, ckpt = prune.run(model, ckpt, settings(method="magnitude", amount=0.5, finetune_epochs=0), ctx(project, data))
    model, ckpt = prune.run(model, ckpt, settings(method="structured", amount=0.5, finetune_epochs=1), ctx(project, data))
    conv = next(m for _, m in weight_layers(model))
    assert ckpt["architecture"]["widths"] == [4, 8] and float((conv.weight == 0).float().mean()) > 0.3


@pytest.mark.parametrize("params, field, expect", [
    ({"method": "structured", "amount": 1.5}, "amount", "less than 1"),
    ({"method": "magnitude", "amount": 0.5, "sopce": "global"}, "sopce", "unknown field"),
    ({"method": "structured", "amount": 0.5, "scope": "global"}, "scope", "magnitude only"),
    ({"amount": 0.5}, "method", "Field required"),
    ({"method": "random", "amount": 0.5}, "method", "'magnitude'"),
    ({"method": "magnitude", "amount": 0.5, "steps": 0}, "steps", "greater than or equal to 1"),
])
def test_bad_settings_name_the_field(kiln_env, params, field, expect):
    write_project(kiln_env["projects"], small_manifest(passes=[{"weight_coding": {}}, {"prune": params}]))
    with pytest.raises(ManifestError) as e:  # refused when the manifest loads, before any stage runs
        load_project("small")
    assert f"field 'compression.passes.1.prune.{field}'" in str(e.value) and expect in str(e.value)
