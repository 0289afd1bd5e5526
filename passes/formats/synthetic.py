"""Dataset format ``synthetic``: a generated, learnable, class-conditional data set of any shape
(images, (1, L) sequences, (1, F) feature vectors), for apps whose data does not exist yet and
for tests at a real app's shape without its data.

Each class has a fixed random template: smooth (random values on a grid about a quarter of
the input's resolution, repeated up to it, so convolutions see local structure and a pooled
feature still differs between classes) plus a per-class, per-channel offset. A sample is its
class's template plus Gaussian noise and a small brightness shift, as uint8 in 0..255.
Deterministic in ``seed``: the templates, the training samples and the test samples each come
from their own seeded stream, so changing ``test_per_class`` leaves the training set alone.
Generated in memory when the data stage loads it (nothing is written outside build/<app>/data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from passes.formats import Loaded

NOISE = 0.08  # std of the per-pixel noise, in [0, 1] units
SHIFT = 0.05  # std of the per-sample brightness shift


def locate(ds, layout) -> tuple[Path, bool]:
    """Nothing on disk to find or synthesize first: ``load`` generates the samples."""
    return layout.synthetic, False


def templates(classes: int, channels: int, size: tuple[int, int], seed: int) -> np.ndarray:
    """(classes, H, W, C) float templates in [0.15, 0.85]."""
    h, w = size
    gh, gw = max(1, -(-h // 4)), max(1, -(-w // 4))
    rng = np.random.default_rng([seed, 0])
    coarse = rng.uniform(-1, 1, (classes, gh, gw, channels))
    fine = np.repeat(np.repeat(coarse, -(-h // gh), axis=1), -(-w // gw), axis=2)[:, :h, :w]
    offset = rng.uniform(-1, 1, (classes, 1, 1, channels))
    return np.clip(0.5 + 0.2 * fine + 0.15 * offset, 0.15, 0.85)


def samples(tmpl: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    k = tmpl.shape[0]
    y = np.repeat(np.arange(k, dtype=np.int64), per_class)
    x = tmpl[y] + rng.normal(0, NOISE, (len(y), *tmpl.shape[1:])) + rng.normal(0, SHIFT, (len(y), 1, 1, 1))
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8), y


def generate(classes: int, channels: int, size: tuple[int, int], per_class: int, test_per_class: int,
             seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x_train, y_train), (x_test, y_test)): uint8 N x H x W x C and int64 labels."""
    tmpl = templates(classes, channels, tuple(size), seed)
    return (samples(tmpl, per_class, np.random.default_rng([seed, 1])),
            samples(tmpl, test_per_class, np.random.default_rng([seed, 2])))


def load(ds, root: Path) -> Loaded:
    train, test = generate(ds.classes, ds.channels, tuple(ds.image_size), ds.per_class, ds.test_per_class, ds.seed)
    params = {"classes": ds.classes, "channels": ds.channels, "image_size": list(ds.image_size),
              "per_class": ds.per_class, "test_per_class": ds.test_per_class, "seed": ds.seed}
    report = {"source": "generated (passes/formats/synthetic.py)", "images": len(train[1]) + len(test[1]),
              "skipped": 0, "skipped_examples": []}
    return Loaded(train, test, report, {"format": "synthetic", "num_classes": ds.classes, "channels": ds.channels,
                                        "synthetic": params, "test_source": "generated"})
