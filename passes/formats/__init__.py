"""Dataset formats, one module each, chosen by a manifest's ``dataset.format`` (the
``Dataset`` union in kiln/schema.py names each module). The data stage (passes/data.py) splits
and writes what a format loads. A format module has

* ``locate(ds, layout) -> (Path, bool)``: where the data is, and whether it must first be
  generated there (``synthesize``); cheap, no data read (doit calls it when it lists tasks). A
  missing data set is a ManifestError naming ``dataset.path``.
* ``load(ds, root) -> Loaded``: the raw samples and labels; unreadable files are reported
  (how many, the first paths) and skipped; a malformed file is a PassError naming it.
* ``infer(ds, root) -> dict`` (formats of a team's own data): the class names (and a table's
  feature columns) when the manifest does not list them; cheap, called when the manifest loads.
* ``synthesize(ds, dest)`` (optional): a deterministic synthetic data set in the format's own
  on-disk layout, so the default run needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Loaded:
    """What a format loads: raw samples in the dataset's layout (``_DatasetBase.layout``: uint8
    N x H x W x C images, int16 N x L audio, float32 N x L x C sequences, float32 N x F tables)
    and int64 labels; ``test`` (``val``) is None when the data set ships no test (validation)
    split: the data stage splits one off the training data."""

    train: tuple[Any, Any]
    test: tuple[Any, Any] | None
    report: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    val: tuple[Any, Any] | None = None
