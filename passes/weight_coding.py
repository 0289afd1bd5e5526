"""Weight coding pass: Deep Compression's weight sharing and Huffman coding (Han et al., 2016).

Per conv/linear layer, k-means (k = 2**bits, linear initialisation between the smallest and
largest weight, Lloyd iterations) clusters the nonzero weights; each weight is replaced by its
centroid, so the accuracy measured afterwards is the shared model's, and exact zeros (pruned
weights) stay zero. The layer is then coded as

* the cluster index of each nonzero weight, Huffman coded;
* where the layer has zeros, their positions as zero-run lengths before each nonzero weight
  (Deep Compression's relative indices), Huffman coded over the symbols 0 .. E = 2**index_bits
  - 1, where E means "E zeros, no weight yet" so any run fits;
* the codebook (4 B per used centroid), the canonical Huffman tables (1 B per code length),
  a header of 8 B (counts), and per output channel the folded bias (4 B) plus, for a conv (or
  linear) with a BatchNorm after it in the fx graph, the BN scale (4 B): BN folds on the board,
  after decoding.

Every Conv2d and Linear anywhere in the module tree is coded (``weight_layers``: nested blocks,
a recurrent cell's gate layers, a shortcut conv), once even when the forward calls it at every
step.

``coded_bytes`` (the sum, in whole bytes per stream) goes to ``ckpt["weight_coding"]`` with a
per-layer breakdown. Every layer's streams are decoded again and checked against the shared
weights, so the size reported is that of a real, lossless encoding.

Settings (kiln.schema.WeightCodingSettings, validated when the manifest loads): ``bits``
(default 4), ``first_bits`` (default 8), ``linear_bits`` (default ``bits``), ``index_bits``
(default 5), ``iterations`` (k-means, default 30), ``finetune_epochs`` (default 1: the shared
values are fine-tuned on the training split, cluster assignments fixed; an anomaly detector's
normal samples only, on its reconstruction loss).
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from typing import Any, Iterable

import numpy as np

from kiln.errors import PassError
from kiln.schema import WeightCodingSettings
from passes.tasks import fit_split
from passes.support.common import bn_after, stored_weight_bytes, trace, weight_layers, weights_sha256
from passes.support.training import finetune_options, fit

log = logging.getLogger("kiln.weight_coding")

HEADER_BYTES = 8  # per layer: nonzero count and the index stream's bit length


# --- Huffman ----------------------------------------------------------------------------------


def huffman_lengths(freq: dict[int, int]) -> dict[int, int]:
    """Code length per symbol of an optimal prefix code for ``freq`` (ties broken by symbol, so
    it is repeatable). A lone symbol gets a 1-bit code."""
    items = sorted((f, s) for s, f in freq.items() if f > 0)
    if not items:
        return {}
    if len(items) == 1:
        return {items[0][1]: 1}
    lengths = {s: 0 for _, s in items}
    heap = [(f, i, [s]) for i, (f, s) in enumerate(items)]
    heapq.heapify(heap)
    order = len(heap)
    while len(heap) > 1:
        f1, _, s1 = heapq.heappop(heap)
        f2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, order, s1 + s2))
        order += 1
    return lengths


def canonical_codes(lengths: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Canonical code (value, length) per symbol: only the lengths need storing."""
    codes, code, prev = {}, 0, 0
    for s, n in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= n - prev
        codes[s] = (code, n)
        code += 1
        prev = n
    return codes


def encode(symbols: Iterable[int], lengths: dict[int, int]) -> tuple[bytes, int]:
    """Pack ``symbols`` with the canonical code of ``lengths``; returns (bytes, bit count)."""
    codes = canonical_codes(lengths)
    bits = "".join(format(c, f"0{n}b") for c, n in (codes[s] for s in symbols))
    packed = np.packbits(np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")) if bits else np.zeros(0, np.uint8)
    return packed.tobytes(), len(bits)


def decode(data: bytes, nbits: int, lengths: dict[int, int]) -> list[int]:
    """Inverse of ``encode``."""
    table = {(n, c): s for s, (c, n) in canonical_codes(lengths).items()}
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:nbits]
    out, code, n = [], 0, 0
    for b in bits.tolist():
        code, n = (code << 1) | b, n + 1
        s = table.get((n, code))
        if s is not None:
            out.append(s)
            code = n = 0
    if n:
        raise PassError("weight coding: a Huffman stream ends inside a code")
    return out


# --- weight sharing ---------------------------------------------------------------------------


def kmeans_1d(values: np.ndarray, k: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars with linear initialisation over [min, max]; returns the used
    centroids (sorted) and each value's index into them."""
    v = values.astype(np.float64)
    if v.size == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    distinct = np.unique(v)
    if len(distinct) <= k:  # already shared (a second run, or after fine-tuning): keep it exact
        return distinct, np.searchsorted(distinct, v)
    c = np.linspace(v.min(), v.max(), k) if k > 1 else np.array([v.mean()])
    for _ in range(iterations):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, v)
        count = np.bincount(idx, minlength=len(c))
        new = np.where(count > 0, np.bincount(idx, weights=v, minlength=len(c)) / np.maximum(count, 1), c)
        if np.array_equal(new, c):
            break
        c = new
    idx = np.searchsorted((c[1:] + c[:-1]) / 2, v)
    used = np.unique(idx)
    remap = np.full(len(c), -1)
    remap[used] = np.arange(len(used))
    return c[used], remap[idx]


def zero_runs(nonzero: np.ndarray, escape: int) -> list[int]:
    """Zero-run symbols of a flat nonzero mask: before each nonzero weight, the zeros since the
    last one, as ``escape`` (= escape zeros, no weight) repeated, then the rest (< escape)."""
    out = []
    last = -1
    for p in np.flatnonzero(nonzero).tolist():
        gap = p - last - 1
        out += [escape] * (gap // escape) + [gap % escape]
        last = p
    return out


def positions(runs: list[int], escape: int) -> list[int]:
    """Inverse of ``zero_runs``: the flat positions of the nonzero weights."""
    out, pos = [], 0
    for r in runs:
        if r == escape:
            pos += escape
        else:
            pos += r
            out.append(pos)
            pos += 1
    return out


def _stream(symbols: list[int]) -> dict[str, Any]:
    lengths = huffman_lengths(Counter(symbols))
    data, nbits = encode(symbols, lengths)
    if decode(data, nbits, lengths) != symbols:
        raise PassError("weight coding: a Huffman stream does not decode to what was coded")
    return {"lengths": lengths, "bits": nbits, "bytes": len(data), "table_bytes": len(lengths)}


def code_layer(w: np.ndarray, bits: int, index_bits: int, iterations: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Share and code one weight tensor; returns the shared weights and the layer's sizes."""
    flat = w.reshape(-1)
    nz = flat != 0
    centroids, idx = kmeans_1d(flat[nz], 2 ** bits, iterations)
    shared = np.zeros_like(flat)
    shared[nz] = centroids[idx].astype(flat.dtype)
    index = _stream(idx.tolist())
    escape = 2 ** index_bits - 1
    sparse = not bool(nz.all())
    pos = _stream(zero_runs(nz, escape)) if sparse else {"bytes": 0, "table_bytes": 0, "bits": 0}
    if sparse and positions(zero_runs(nz, escape), escape) != np.flatnonzero(nz).tolist():
        raise PassError("weight coding: zero runs do not give back the nonzero positions")
    info = {"weights": int(flat.size), "nonzero": int(nz.sum()), "clusters": int(len(centroids)),
            "index_bytes": index["bytes"], "position_bytes": pos["bytes"],
            "table_bytes": index["table_bytes"] + pos["table_bytes"], "codebook_bytes": 4 * len(centroids),
            "bits_per_nonzero": (index["bits"] + pos["bits"]) / max(1, int(nz.sum()))}
    return shared.reshape(w.shape), info


def _followed_by_bn(model) -> set[str]:
    """Names of the conv/linear layers with a BatchNorm folded into them (a BatchNorm2d applied
    to a conv's output, a BatchNorm1d to a linear's, and to nothing else): each stores its BN
    scale per output channel. Read from the fx graph, so it holds for any graph (a residual
    block's shortcut conv, a module's BN declared far from its conv); a model fx cannot trace
    falls back to module order (a BN declared right after its layer), with a warning."""
    import torch.nn as nn

    try:
        return set(bn_after(model))
    except PassError as e:
        log.warning("weight coding: %s; BatchNorm after a layer is read from module order instead", e)
    mods = list(model.named_modules())
    return {n for (n, m), (_, nxt) in zip(mods, mods[1:])
            if (isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d))
            or (isinstance(m, nn.Linear) and isinstance(nxt, nn.BatchNorm1d))}


def _first_layer(model):
    """The conv/linear layer that reads the input (the first called in the fx graph; without a
    graph, the first in module order)."""
    layers = dict(weight_layers(model))
    try:
        gm = trace(model, "weight coding")
    except PassError:
        return next(iter(layers.values()), None)
    return next((layers[n.target] for n in gm.graph.nodes if n.op == "call_module" and n.target in layers),
                next(iter(layers.values()), None))


def share(model, bits_of) -> dict[str, tuple[Any, Any]]:
    """Replace each layer's nonzero weights by their k-means centroid; returns per layer the
    nonzero positions and cluster indices (flat), which fine-tuning keeps fixed."""
    import torch

    clusters = {}
    with torch.no_grad():
        for name, m in weight_layers(model):
            flat = m.weight.detach().reshape(-1).numpy()
            nz = np.flatnonzero(flat)
            centroids, idx = kmeans_1d(flat[nz], 2 ** bits_of(m), bits_of.iterations)
            shared = np.zeros_like(flat)
            shared[nz] = centroids[idx]
            m.weight.copy_(torch.from_numpy(shared).view_as(m.weight))
            clusters[name] = (torch.from_numpy(nz), torch.from_numpy(idx))
    return clusters


def tie_to_clusters(model, clusters) -> None:
    """Set each weight to the mean of its cluster (after an optimizer step): the centroids move
    by their members' mean update, as in Deep Compression's fine-tuning; zeros stay zero."""
    import torch

    with torch.no_grad():
        for name, m in weight_layers(model):
            nz, idx = clusters[name]
            flat = m.weight.view(-1)
            vals = flat[nz]
            k = int(idx.max()) + 1 if len(idx) else 0
            sums = torch.zeros(k, dtype=vals.dtype).index_add_(0, idx, vals)
            counts = torch.bincount(idx, minlength=k).clamp_(min=1).to(vals.dtype)
            flat.zero_()
            flat[nz] = (sums / counts)[idx]


class _Bits:
    """Index bits of a layer: first_bits for the layer reading the input (unless it is linear),
    linear_bits for linear layers."""

    def __init__(self, s: WeightCodingSettings, model):
        self.s, self.iterations = s, s.iterations
        self.first = _first_layer(model)

    def __call__(self, m) -> int:
        import torch.nn as nn

        if isinstance(m, nn.Linear):
            return self.s.linear_bits or self.s.bits
        return (self.s.first_bits or self.s.bits) if m is self.first else self.s.bits


def run(model, ckpt: dict, settings: WeightCodingSettings, ctx) -> tuple[Any, dict]:
    import torch

    s = settings
    bits_of = _Bits(s, model)
    clusters = share(model, bits_of)
    if s.finetune_epochs:
        cfg = ctx.project.training
        torch.manual_seed(ctx.seed)
        torch.set_num_threads(cfg.threads)
        xtr, ytr = fit_split(ctx.project, ctx.data_dir, "train")  # an anomaly detector's: normal samples only
        fit(model, xtr, ytr, epochs=s.finetune_epochs, batch=cfg.batch, lr=s.finetune_lr or cfg.lr / 3,
            aug=ctx.project.dataset.augment, gen=torch.Generator().manual_seed(ctx.seed),
            after_step=lambda m: tie_to_clusters(m, clusters), tag=f"weight coding {ctx.project.name}",
            loss=ctx.project.objective, **finetune_options(ctx.project, ctx.data_dir, ytr))
    bn_convs = _followed_by_bn(model)
    layers, total = [], 0
    for name, m in weight_layers(model):
        shared, info = code_layer(m.weight.detach().numpy(), bits_of(m), s.index_bits, s.iterations)
        if not np.array_equal(shared, m.weight.detach().numpy()):
            raise PassError(f"weight coding: layer {name} is not shared after fine-tuning")
        out = m.weight.shape[0]
        info.update(name=name, bits=bits_of(m), bias_bytes=4 * out * (2 if name in bn_convs else 1), header_bytes=HEADER_BYTES)
        info["coded_bytes"] = sum(info[k] for k in ("index_bytes", "position_bytes", "table_bytes", "codebook_bytes",
                                                   "bias_bytes", "header_bytes"))
        total += info["coded_bytes"]
        layers.append(info)
        log.info("weight coding %s: %s: %d/%d nonzero, %d clusters, %.2f bits per nonzero, %d bytes", ctx.project.name,
                 name, info["nonzero"], info["weights"], info["clusters"], info["bits_per_nonzero"], info["coded_bytes"])
    fp32 = stored_weight_bytes(model, {})
    ckpt = {k: v for k, v in ckpt.items() if k != "state_dict"}  # the model's weights are saved
    ckpt = dict(ckpt, weight_coding={**s.model_dump(), "coded_bytes": total, "fp32_bytes": fp32,
                                     "ratio": fp32 / total, "weights_sha256": weights_sha256(model), "layers": layers})
    log.info("weight coding %s: %d bytes coded (fp32: %d, %.1fx)", ctx.project.name, total, fp32, fp32 / total)
    model.eval()
    return model, ckpt
