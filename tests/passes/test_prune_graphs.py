"""Structured pruning of graphs beyond the cnn family's Sequential: a ResNet block with its
shortcuts, depthwise-separable blocks, an MLP with BatchNorm1d, a conv (1, 3) net over a
sequence, an unrolled LSTM cell. Each is pruned by the pass itself (torch-pruning's groups,
folded L1 scores, fine-tuning), keeps its output shape and classes, loses parameters, and its
checkpoint rebuilds from the saved shapes into a model with equal outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from kiln.errors import PassError
from kiln.nets import build, measure
from kiln.schema import PruneSettings, Project, parse_architecture
from passes import compress, prune
from passes.support.common import rebuild, restore, save_checkpoint, to_tensor
from passes.support.training import fit
from tests.passes.conftest import SMALL, randomize_bn, write_splits


class ResNet(nn.Module):
    """Stem, an identity-shortcut basic block, a strided block with a 1x1 conv shortcut; the
    shortcut's BN is declared away from its conv (module order says nothing)."""

    def __init__(self, c: int = 1, k: int = 10):
        super().__init__()
        self.bsc = nn.BatchNorm2d(16)
        self.stem, self.bn0 = nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.c4, self.b4 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.sc = nn.Conv2d(8, 16, 1, stride=2)
        self.relu, self.pool, self.flat, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, k)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        y = self.relu(self.b1(self.c1(x)))
        x = self.relu(self.b2(self.c2(y)) + x)
        y = self.relu(self.b3(self.c3(x)))
        x = self.relu(self.b4(self.c4(y)) + self.bsc(self.sc(x)))
        return self.fc(self.flat(self.pool(x)))


def _dw(c: int, o: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c, c, 3, stride, 1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, o, 1), nn.BatchNorm2d(o), nn.ReLU()]


def mobilenet(c: int = 1, k: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), *_dw(8, 16), *_dw(16, 32, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, k))


def mlp(features: int = 64, k: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16),
                         nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, k))


def conv1d(c: int = 8, k: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, 16, (1, 3), padding=(0, 1)), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, (1, 3), padding=(0, 1)), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.MaxPool2d((1, 2)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, k))


class LSTM(nn.Module):
    """A conv (1, 3) front end, then an LSTM cell unrolled over the sequence's steps with
    nn.Linear gates and constant slices (what TVM's frontend takes; it has no LSTM op)."""

    def __init__(self, c: int = 8, steps: int = 8, hidden: int = 12, k: int = 10):
        super().__init__()
        self.steps, self.hidden = steps, hidden
        self.conv, self.bn, self.relu = nn.Conv2d(c, 16, (1, 3), padding=(0, 1)), nn.BatchNorm2d(16), nn.ReLU()
        self.wx, self.wh = nn.Linear(16, 4 * hidden), nn.Linear(hidden, 4 * hidden, bias=False)
        self.fc = nn.Linear(hidden, k)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        n = self.hidden
        for t in range(self.steps):
            g = self.wx(x[:, :, 0, t])
            if t:
                g = g + self.wh(h)  # noqa: F821 (set at t = 0)
            i, f = torch.sigmoid(g[:, 0:n]), torch.sigmoid(g[:, n:2 * n])
            gg, o = torch.tanh(g[:, 2 * n:3 * n]), torch.sigmoid(g[:, 3 * n:4 * n])
            c = i * gg if t == 0 else f * c + i * gg  # noqa: F821
            h = o * torch.tanh(c)
        return self.fc(h)


# name -> (constructor, sequence input?, the channels each conv/linear keeps after amount 0.5)
NETS = {
    "resnet": (ResNet, False, {"stem": 4, "c1": 4, "c2": 4, "c3": 8, "c4": 8, "sc": 8, "fc": 10}),
    "mobilenet": (mobilenet, False, {"0": 4, "3": 4, "6": 8, "9": 8, "12": 16, "17": 10}),
    "mlp": (mlp, False, {"1": 16, "4": 8, "8": 10}),
    "conv1d": (conv1d, True, {"0": 8, "3": 8, "9": 10}),
    "lstm": (LSTM, True, {"conv": 8, "wx": 48, "wh": 48, "fc": 10}),  # the gates keep their hidden units
}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """The tiny 10-class set as 8x8 images and as sequences of 8 channels x 8 steps (C, 1, L)."""
    images = write_splits(tmp_path_factory.mktemp("images"))
    seq = tmp_path_factory.mktemp("sequences")
    for split in ("train", "val", "test"):
        with np.load(images / f"{split}.npz") as z:
            # NHWC (n, 8, 8, 1) -> (n, 1, 8, 8): height 1, 8 steps, 8 channels
            np.savez(seq / f"{split}.npz", x=z["x"].reshape(-1, 1, 8, 8), y=z["y"])
    return {False: images, True: seq}


def project(sequence: bool) -> Project:
    data = copy.deepcopy(SMALL)
    if sequence:  # rotating a sequence means nothing
        data["dataset"]["augment"] = {}
    return Project.model_validate(data)


def trained(name: str, splits):
    """(model, data dir, project) of the net trained a few epochs on its data."""
    make, sequence, _ = NETS[name]
    torch.manual_seed(0)
    model, data, proj = make(), splits[sequence], project(sequence)
    with np.load(data / "train.npz") as z:
        x, y = z["x"], z["y"]
    fit(model, x, y, epochs=6, batch=32, lr=0.01, aug=proj.dataset.augment, gen=torch.Generator().manual_seed(0))
    return model.eval(), data, proj


def layers(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("name", list(NETS))
def test_structured_pruning_of_a_graph(name, splits, tmp_path):
    make, sequence, expect = NETS[name]
    model, data, proj = trained(name, splits)
    with np.load(data / "val.npz") as z:
        x = to_tensor(z["x"][:16])
    shape = tuple(x.shape[1:])
    before = measure(model, shape)
    ckpt = {"architecture": {"family": name}, "channels": shape[0], "num_classes": 10, "image_size": list(shape[1:])}
    ctx = compress.PassContext(proj, data, 0, 0, "prune")
    pruned, out = prune.run(model, ckpt, PruneSettings(method="structured", amount=0.5, steps=2, finetune_epochs=1), ctx)

    assert {n: (m.weight.shape[0]) for n, m in layers(pruned).items()} == expect
    with torch.no_grad():
        assert pruned(x).shape == (16, 10)
    after = measure(pruned, shape)
    assert after.params < before.params and after.macs < before.macs
    for m in pruned.modules():  # a depthwise conv stays depthwise
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels
    rounds = out["pruning"][0]["rounds"]
    assert len(rounds) == 2 and rounds[-1]["channels"] == expect
    assert rounds[-1]["val_accuracy"] > 0.3  # fine-tuned: far above chance (0.1) after losing half its channels
    kept = out["pruning"][0]["kept_whole"]
    assert "produces the model's output" in kept[[n for n in expect][-1]]
    if name == "lstm":
        assert "sliced along channels" in kept["wx"] and "sliced along channels" in kept["wh"]

    # the checkpoint, saved and read back, rebuilds from its shapes into the same function
    save_checkpoint(tmp_path / "c.pt", dict(out, state_dict=pruned.state_dict()))
    saved = torch.load(tmp_path / "c.pt", weights_only=False)
    again = restore(make(), saved["state_dict"])
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


def test_rebuild_adopts_saved_shapes_for_a_family_build():
    """``common.rebuild`` of a pruned cnn whose architecture still says the old widths: the
    layers take the saved shapes (the path every family without widths takes)."""
    torch.manual_seed(0)
    arch = {"family": "cnn", "widths": [6, 10], "max_macs": 10**9}
    model = build(parse_architecture(arch), 1, 10, (8, 8))
    randomize_bn(model)
    model.eval()
    x = torch.rand(4, 1, 8, 8)
    prune.Structured(model, x, amount=0.5, steps=1).step()
    ckpt = {"architecture": arch, "channels": 1, "num_classes": 10, "image_size": [8, 8], "state_dict": model.state_dict()}
    again = rebuild(ckpt)
    assert [m.out_channels for m in again.modules() if isinstance(m, nn.Conv2d)] == [3, 5]
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_a_state_dict_no_resize_explains_is_refused():
    model = mobilenet()
    state = mobilenet().state_dict()
    state["3.weight"] = torch.zeros(8, 1, 5, 5)  # another kernel size: not a pruned conv
    with pytest.raises(RuntimeError, match="3.weight"):
        restore(model, state)


def test_a_grouping_mistake_is_refused(monkeypatch):
    """Fault injection: when the masked reference is not masked as the pruning removed, the
    round's equivalence check refuses it, naming the groups."""
    torch.manual_seed(0)
    model = ResNet().eval()
    randomize_bn(model)
    monkeypatch.setattr(prune, "mask_inputs", lambda model, members: None)
    with pytest.raises(PassError, match="do not preserve the model.*stem out 4"):
        prune.Structured(model, torch.rand(4, 1, 8, 8), amount=0.5, steps=1, field="compression.passes.0.prune").step()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.fc(x.flatten(1))


def test_an_untraceable_model_is_refused_with_the_reason():
    with pytest.raises(PassError, match="compression.passes.0.prune.*torch.fx can trace.*Untraceable"):
        prune.Structured(Untraceable(), torch.rand(2, 1, 8, 8), 0.5, 1, "compression.passes.0.prune")


FAMILIES = [  # (architecture, channels, image size, classes): small builds of Kiln's families
    ({"family": "cnn", "widths": [8, 16], "head": "flatten", "max_macs": 10**9}, 1, (8, 8), 10),
    ({"family": "ds_cnn", "filters": 16, "widths": [16, 16]}, 1, (10, 8), 12),
    ({"family": "mobilenet_v1", "alpha": 0.25, "blocks": 4}, 3, (32, 32), 2),
    ({"family": "resnet", "stem": 8, "widths": [8, 16], "blocks": 2}, 3, (16, 16), 10),
    ({"family": "resnet", "stem": 8, "widths": [8, 16], "shortcut_bn": False}, 3, (16, 16), 10),
    ({"family": "mlp", "widths": [32, 16], "batch_norm": True}, 1, (8, 8), 10),
    ({"family": "conv1d", "widths": [16, 16]}, 6, (1, 32), 5),
    ({"family": "autoencoder", "widths": [32, 32], "bottleneck": 8}, 1, (1, 64), 1),
]


def _randomize_bn(model) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.3, 0.3)


@pytest.mark.parametrize("arch, c, size, k", FAMILIES, ids=[f"{a['family']}-{i}" for i, (a, *_) in enumerate(FAMILIES)])
def test_every_family_prunes_and_its_checkpoint_rebuilds(arch, c, size, k):
    """Each family's own build, pruned, comes back from ``common.rebuild`` (its architecture as
    saved, the layers resized from the state_dict) computing the same outputs."""
    torch.manual_seed(0)
    model = build(parse_architecture(arch), c, k, size).eval()
    _randomize_bn(model)
    x = torch.rand(4, c, *size)
    out_shape = model(x).shape
    before = measure(model, (c, *size))
    prune.Structured(model, x, amount=0.5, steps=1).step()
    assert model(x).shape == out_shape and measure(model, (c, *size)).params < before.params
    again = rebuild({"architecture": arch, "channels": c, "num_classes": k, "image_size": list(size),
                     "state_dict": model.state_dict()})
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_recurrent_family_with_nothing_prunable_is_refused(cell):
    """The rnn family is gate layers and a head: no channel can go, and the pass says why
    rather than returning the model unchanged."""
    model = build(parse_architecture({"family": "rnn", "cell": cell, "hidden": 12}), 6, 5, (1, 10)).eval()
    with pytest.raises(PassError, match="finds no channels it can remove.*sliced along channels.*use method magnitude"):
        prune.Structured(model, torch.rand(2, 6, 1, 10), 0.5, 1, "compression.passes.0.prune")


def test_an_autoencoder_is_pruned_and_fine_tuned_on_its_reconstruction(splits):
    """The family's objective picks the fine-tuning loss: an autoencoder fine-tunes on MSE and
    its rounds report val_mse; its output layer keeps the input's size."""
    data = copy.deepcopy(SMALL)
    data["architecture"] = {"family": "autoencoder", "widths": [32, 16], "bottleneck": 8}
    data["requirements"] = {}  # an anomaly detector: digits 0-8 normal, 9 anomalous
    data["anomaly"] = {"normal": [str(d) for d in range(9)]}
    proj = Project.model_validate(data)
    torch.manual_seed(0)
    model = build(proj.architecture, 1, 10, (8, 8)).eval()
    ckpt = {"architecture": proj.architecture.model_dump(), "channels": 1, "num_classes": 10, "image_size": [8, 8]}
    ctx = compress.PassContext(proj, splits[False], 0, 0, "prune")
    pruned, out = prune.run(model, ckpt, PruneSettings(method="structured", amount=0.5, finetune_epochs=2), ctx)
    rounds = out["pruning"][0]["rounds"]
    assert "val_mse" in rounds[0] and "val_accuracy" not in rounds[0] and rounds[0]["val_mse"] < 0.2
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert pruned(x).shape == (3, 64)
    again = rebuild(dict(out, state_dict=pruned.state_dict()))
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))


@pytest.mark.parametrize("name", list(NETS))
def test_magnitude_pruning_of_a_graph(name, splits):
    """Unstructured masks reach every conv/linear of the tree (a gate layer called at every
    step included) and stay exact zeros through fine-tuning."""
    make, sequence, _ = NETS[name]
    torch.manual_seed(0)
    model = make().eval()
    ckpt = {"architecture": {"family": name}}
    ctx = compress.PassContext(project(sequence), splits[sequence], 0, 0, "prune")
    pruned, out = prune.run(model, ckpt, PruneSettings(method="magnitude", amount=0.6, finetune_epochs=1), ctx)
    for n, m in pruned.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert int((m.weight == 0).sum()) == round(0.6 * m.weight.numel()), n


class _ChunkedGates(nn.Module):
    """Gates split with chunk, a softmax before the output: both must keep their layers whole."""

    def __init__(self):
        super().__init__()
        self.fc1, self.gates, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 24), nn.Linear(12, 10)
        self.flat, self.softmax = nn.Flatten(), nn.Softmax(dim=1)

    def forward(self, x):
        a, b = self.gates(torch.relu(self.fc1(self.flat(x)))).chunk(2, 1)
        return self.softmax(self.fc2(torch.sigmoid(a) * torch.tanh(b)))


def test_split_gates_and_the_classifier_behind_a_softmax_keep_their_channels():
    model = _ChunkedGates().eval()
    kept = prune.protected_layers(model)
    assert set(kept) == {"gates", "fc2"} and "sliced along channels" in kept["gates"]
    prune.Structured(model, torch.rand(4, 1, 8, 8), amount=0.5, steps=1).step()
    assert (model.fc1.out_features, model.gates.out_features, model.fc2.out_features) == (16, 24, 10)
