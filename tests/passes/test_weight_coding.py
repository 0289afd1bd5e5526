"""The weight coding pass: Huffman coding is optimal and lossless, k-means shares at most
2**bits values per layer and keeps zeros, the coded size is real and below fp32."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn

from kiln.schema import PruneSettings, WeightCodingSettings
from passes import compress, prune, weight_coding as wc
from passes.support.common import load_checkpoint, stored_weight_bytes, weight_layers
from tests.passes.test_prune_graphs import LSTM, ResNet, mlp


def ctx(project, data, name="weight_coding", index=0):
    return compress.PassContext(project, data, project.training.seed, index, name)


@pytest.mark.parametrize("symbols", [
    np.random.default_rng(0).geometric(0.3, size=5000).tolist(),  # skewed, many symbols
    np.random.default_rng(1).integers(0, 16, size=777).tolist(),  # near uniform, odd length
    [7] * 10,                                                    # one symbol
    [0, 1],
])
def test_huffman_round_trip_and_size(symbols):
    freq = Counter(symbols)
    lengths = wc.huffman_lengths(freq)
    data, nbits = wc.encode(symbols, lengths)
    assert nbits == sum(f * lengths[s] for s, f in freq.items())
    assert len(data) == math.ceil(nbits / 8)
    assert wc.decode(data, nbits, lengths) == symbols
    if len(freq) > 1:  # a complete prefix code (Kraft equality)
        assert sum(2.0 ** -n for n in lengths.values()) == pytest.approx(1.0)


def test_huffman_is_optimal_on_a_textbook_case():
    freq = {0: 45, 1: 13, 2: 12, 3: 16, 4: 9, 5: 5}  # CLRS 16.3: 224 bits
    lengths = wc.huffman_lengths(freq)
    assert sum(f * lengths[s] for s, f in freq.items()) == 224
    assert lengths[0] == 1


def test_zero_runs_give_back_positions_across_long_gaps():
    mask = np.zeros(200, dtype=bool)
    mask[[0, 1, 5, 40, 41, 199]] = True  # gaps 0, 0, 3, 34 (> escape 31), 0, 157
    runs = wc.zero_runs(mask, escape=31)
    assert max(runs) == 31 and wc.positions(runs, 31) == [0, 1, 5, 40, 41, 199]


def test_kmeans_shares_at_most_2_bits_values_and_is_exact_when_already_shared():
    v = np.random.default_rng(0).normal(size=1000)
    c, idx = wc.kmeans_1d(v, 16, 30)
    assert len(c) <= 16 and idx.max() < len(c) and np.all(np.diff(c) > 0)
    shared = c[idx]
    assert np.abs(shared - v).mean() < 0.1
    c2, idx2 = wc.kmeans_1d(shared, 16, 30)
    assert np.array_equal(c2[idx2], shared)


def test_weight_coding_on_a_pruned_model(small_trained, caplog):
    project, data, model_pt = small_trained
    model, ckpt = load_checkpoint(model_pt)
    model, ckpt = prune.run(model, ckpt, PruneSettings(method="magnitude", amount=0.6, finetune_epochs=0),
                            ctx(project, data, "prune"))
    zeros = {n: (m.weight == 0).clone() for n, m in weight_layers(model)}
    fp32 = stored_weight_bytes(model, ckpt)
    with caplog.at_level("INFO", logger="kiln.train"):
        model, out = wc.run(model, ckpt, WeightCodingSettings(bits=3, first_bits=4, finetune_epochs=1),
                            ctx(project, data, index=1))
    # fine-tuning without validation images logs the metrics it has: no "val_acc nan"
    epochs = [r.getMessage() for r in caplog.records if r.name == "kiln.train"]
    assert epochs and epochs[0].startswith("weight coding small: epoch 1/1 loss ") and "val_acc" not in epochs[0], epochs
    for i, (name, m) in enumerate(weight_layers(model)):
        values = torch.unique(m.weight[m.weight != 0])
        assert len(values) <= (2 ** 4 if i == 0 else 2 ** 3), name
        assert torch.equal(m.weight == 0, zeros[name]), name  # pruned stays pruned, kept stays kept
    info = out["weight_coding"]
    assert info["coded_bytes"] == sum(layer["coded_bytes"] for layer in info["layers"])
    assert all(layer["position_bytes"] > 0 for layer in info["layers"])  # sparse layers code their zeros
    assert info["coded_bytes"] < fp32 / 5 and info["fp32_bytes"] == fp32
    assert compress.coded_bytes(model, out) == info["coded_bytes"]
    with torch.no_grad():  # a later change of the weights invalidates the coded size
        weight_layers(model)[0][1].weight.mul_(1.01)
    assert compress.coded_bytes(model, out) is None


def test_weight_coding_is_deterministic_and_dense_layers_code_no_positions(small_trained):
    project, data, model_pt = small_trained
    outs = []
    for _ in range(2):
        model, ckpt = load_checkpoint(model_pt)
        outs.append(wc.run(model, ckpt, WeightCodingSettings(finetune_epochs=0), ctx(project, data))[1]["weight_coding"])
    assert outs[0] == outs[1]
    assert all(layer["position_bytes"] == 0 for layer in outs[0]["layers"])
    assert outs[0]["coded_bytes"] < outs[0]["fp32_bytes"] / 3


class _Late(nn.Module):
    """The conv that reads the input is declared second: module order does not say which is first."""

    def __init__(self):
        super().__init__()
        self.b, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.pool, self.flat, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.bn(self.b(torch.relu(self.a(x)))))))


@pytest.mark.parametrize("make, with_bn, first", [
    (ResNet, {"stem", "c1", "c2", "c3", "c4", "sc"}, "stem"),  # sc's BN is declared first of all
    (mlp, {"1", "4"}, "1"),                                     # Linear + BatchNorm1d
    (LSTM, {"conv"}, "conv"),                                   # gate layers called every step, coded once
    (_Late, {"b"}, "a"),
])
def test_weight_coding_reads_the_graph(make, with_bn, first, small_trained):
    """Every conv/linear anywhere in the tree is coded once; BatchNorm after a layer (whose
    scale is stored per channel) and the layer that reads the input come from the fx graph."""
    project, data, _ = small_trained
    torch.manual_seed(0)
    model = make().eval()
    names = [n for n, _ in weight_layers(model)]
    model, out = wc.run(model, {"architecture": {}}, WeightCodingSettings(bits=3, first_bits=6, linear_bits=3,
                                                                        finetune_epochs=0), ctx(project, data))
    layers = {layer["name"]: layer for layer in out["weight_coding"]["layers"]}
    assert list(layers) == names
    mods = dict(model.named_modules())
    for name, layer in layers.items():
        outs = mods[name].weight.shape[0]
        assert layer["bias_bytes"] == 4 * outs * (2 if name in with_bn else 1), name
        assert layer["bits"] == (6 if name == first and isinstance(mods[name], nn.Conv2d) else 3), name
        assert layer["clusters"] <= 2 ** layer["bits"]
    assert out["weight_coding"]["coded_bytes"] < out["weight_coding"]["fp32_bytes"] / 3
