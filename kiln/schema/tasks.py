"""Tasks: what the net is trained to do."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from kiln.schema.base import Strict


class Anomaly(Strict):
    """Anomaly detection, for a net whose objective is reconstruction (families autoencoder and
    mlperf_ad, a module with objective reconstruction; MLPerf Tiny's anomaly benchmark): it is
    trained and compressed on the ``normal`` classes' samples only; a sample's score is the mean
    squared error of its reconstruction (over the net's input features); the test AUC ranks the
    normal samples (negative) against every other class's (anomalous, positive)."""

    normal: list[str] = Field(min_length=1, description="the classes that are normal, by name (formats without "
                              "class names, gtsrb, digits and synthetic, name them by index: '0', '1', ...); "
                              "every other class is anomalous")

    @field_validator("normal", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        # YAML reads `normal: [0]` as an int: a class index named as the formats without names do
        if isinstance(v, list):
            v = [str(n) if isinstance(n, int) and not isinstance(n, bool) else n for n in v]
            if len(set(map(str, v))) != len(v):
                raise ValueError("a class is listed twice")
        return v

    def indices(self, names: list[str]) -> list[int]:
        """The labels (indices into ``names``) of the normal classes; ValueError naming the
        field when a name is not a class of the data, or when no class is left anomalous."""
        unknown = [(i, n) for i, n in enumerate(self.normal) if n not in names]
        if unknown:
            i, n = unknown[0]
            raise ValueError(f"anomaly.normal.{i}: '{n}' is not a class of the dataset (classes: {', '.join(names)})")
        if len(self.normal) >= len(names):
            raise ValueError(f"anomaly.normal: every class ({', '.join(names)}) is normal: no anomalous samples "
                             "to measure an AUC on")
        return [names.index(n) for n in self.normal]
