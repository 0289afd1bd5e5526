"""Compression passes (``CompressionStep``, by the pass's name): one settings model per pass."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, Tag, ValidationInfo, create_model, field_validator, model_validator

from kiln.schema.base import Strict


# --- compression passes: settings per pass (a manifest's compression.passes.<i>.<pass>) -------


class PruneSettings(Strict):
    """passes/prune.py: magnitude (unstructured) or L1-norm channel (structured, torch-pruning) pruning."""

    name: ClassVar[str] = "prune"  # the key of a manifest's compression.passes.<i>
    implementation: ClassVar[str] = "passes.prune"

    method: Literal["magnitude", "structured", "l1_structured"] = Field(
        description="magnitude: zero the smallest weights; structured (= l1_structured): remove whole "
        "channels (conv filters, linear features, with their BatchNorm entries and the next layers' inputs) "
        "of smallest BN-folded L1 norm, in any graph; the classifier's outputs and recurrent gate layers keep theirs"
    )
    amount: float = Field(
        gt=0, lt=1, description="share of weights (magnitude) or of each prunable channel group's channels "
        "(structured) removed in the end"
    )
    scope: Literal["global", "layer"] | None = Field(
        None, description="magnitude only: one threshold over all layers (global) or the same share per layer "
        "(layer, the default)"
    )
    steps: int = Field(1, ge=1, le=20, description="prune in this many equal rounds, fine-tuning after each")
    finetune_epochs: int = Field(1, ge=0, le=1000, description="epochs of fine-tuning on the training split after each round")
    finetune_lr: float | None = Field(None, gt=0, le=10, description="peak (one-cycle) learning rate of fine-tuning "
                                      "(default: training.lr)")

    @field_validator("scope")
    @classmethod
    def _scope(cls, v: str | None, info: ValidationInfo) -> str | None:
        method = info.data.get("method")
        if v is not None and method not in (None, "magnitude"):
            raise ValueError(f"applies to method magnitude only, not {method}")
        return v


class WeightCodingSettings(Strict):
    """passes/weight_coding.py: per-layer k-means weight sharing + Huffman coding (Deep Compression)."""

    name: ClassVar[str] = "weight_coding"  # the key of a manifest's compression.passes.<i>
    implementation: ClassVar[str] = "passes.weight_coding"

    bits: int = Field(4, ge=1, le=8, description="cluster index bits: at most 2**bits shared values per layer")
    first_bits: int | None = Field(8, ge=1, le=8, description="bits for the first conv, which sees the input: small "
                                   "and the most sensitive to sharing (null: bits)")
    linear_bits: int | None = Field(None, ge=1, le=8, description="bits for linear layers (default: bits)")
    index_bits: int = Field(5, ge=1, le=12, description="sparse layers: zero-run symbols 0..2**index_bits-1 (the last "
                            "one means 'that many zeros, go on')")
    iterations: int = Field(30, ge=1, le=1000, description="k-means (Lloyd) iterations at most")
    finetune_epochs: int = Field(1, ge=0, le=1000, description="epochs fine-tuning the shared values (cluster "
                                 "assignments fixed) on the training split")
    finetune_lr: float | None = Field(None, gt=0, le=10, description="peak learning rate of that fine-tuning "
                                      "(default: training.lr / 3)")


class QuantizeSettings(Strict):
    """passes/quantize.py: int8 post-training quantization (per-channel weights, per-tensor activations)."""

    name: ClassVar[str] = "quantize"  # the key of a manifest's compression.passes.<i>
    implementation: ClassVar[str] = "passes.quantize"

    mode: Literal["int8", "weight_only"] = Field(
        "int8", description="int8: 8-bit activations too (uint8 where non-negative, else int8), integer "
        "conv/depthwise/dense with int32 accumulation, add/sub/mul in integer arithmetic and sigmoid/tanh as 256-entry tables in the kernel library, any graph in the op vocabulary; weight_only: int8 weights dequantized inside float kernels"
    )
    calibration_samples: int = Field(512, ge=1, le=100_000, description="training-split images that calibrate activation ranges (int8)")
    calibration: Literal["minmax", "percentile"] = Field(
        "percentile", description="activation range per tensor: observed min/max, or the percentiles below"
    )
    percentile: float = Field(99.99, gt=50, le=100, description="calibration percentile: upper percentile kept (lower: 100 - it)")

# the registry of compression passes: one settings model per pass, in the order the JSON Schema
# lists them; adding a pass is its settings model (``name``, ``implementation``) and one entry here
PASSES: tuple[type[Strict], ...] = (PruneSettings, WeightCodingSettings, QuantizeSettings)


class _Step(Strict):
    """One entry of compression.passes: ``- <pass name>: {settings}``. One step model per pass,
    derived from its settings model (``PruneStep`` has one field, ``prune: PruneSettings``)."""

    settings_model: ClassVar[type[Strict]]
    implementation: ClassVar[str]

    @property
    def name(self) -> str:
        return self.settings_model.name

    @property
    def settings(self):
        return getattr(self, self.name)


def _step_model(settings: type[Strict]) -> type[_Step]:
    step = create_model(settings.__name__.removesuffix("Settings") + "Step", __base__=_Step,
                        __module__=__name__, **{settings.name: (settings, ...)})
    step.settings_model = settings
    step.implementation = settings.implementation
    return step


_STEPS: tuple[type[_Step], ...] = tuple(_step_model(s) for s in PASSES)
PASS_SETTINGS: dict[str, type[Strict]] = {s.name: s for s in PASSES}


def _step_name(v: Any) -> str | None:
    if isinstance(v, _Step):
        return v.name
    if isinstance(v, dict) and len(v) == 1:
        return str(next(iter(v)))
    return None


CompressionStep = Annotated[
    Union[tuple(Annotated[m, Tag(m.settings_model.name)] for m in _STEPS)],
    Discriminator(_step_name, custom_error_type="compression_pass",
                  custom_error_message="expected one compression pass name mapped to its settings, one of: "
                  + ", ".join(PASS_SETTINGS)),
]


class CompressionSearch(Strict):
    """Try several values of one pass setting; keep the smallest model inside the budgets."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    pass_: str = Field(alias="pass", description="a pass listed in compression.passes (its first occurrence)")
    field: str = Field(description="one of that pass's settings, e.g. amount")
    values: list[Any] = Field(min_length=1, description="values to try, each a valid setting")


class Compression(Strict):
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="largest val top-1 drop vs the trained model")
    passes: list[CompressionStep] = Field(
        default_factory=list, description="ordered compression passes, each one pass name mapped to its settings, "
        "e.g. - prune: {method: structured, amount: 0.5}"
    )
    min_weight_ratio: float | None = Field(
        None, gt=0, description="smallest acceptable baseline weight bytes / final weight bytes "
        "(coded bytes when weight_coding ran, else as stored)"
    )
    max_weight_bytes: int | None = Field(
        None, gt=0, description="largest acceptable final weight bytes (coded when weight_coding ran, else as stored)"
    )
    library_bytes: bool = Field(
        True, description="also compile each row's model for x86-host and report its kernel library size"
    )
    search: CompressionSearch | None = None

    @model_validator(mode="after")
    def _quantize_comes_last(self) -> Compression:
        """quantize turns the model into integers: a pass after it (pruning, weight coding, both
        fine-tune with gradients) cannot run on it, so the order is refused when the manifest loads."""
        names = [p.name for p in self.passes]
        if "quantize" in names:
            q = names.index("quantize")
            later = [(i, n) for i, n in enumerate(names) if i > q]
            if later:
                i, n = later[0]
                fixed = [x for x in names if x != "quantize"] + ["quantize"]
                raise ValueError(f"passes.{i} ({n}) comes after passes.{q} (quantize), but {n} cannot run on a "
                                 f"quantized model; quantize must be the last pass: list them as "
                                 f"[{', '.join(fixed)}]")
        return self

    @model_validator(mode="after")
    def _search_names_a_pass(self) -> Compression:
        """compression.search: its pass is listed, its field is a setting of that pass and each
        value is a valid setting; checked when the manifest loads, before any pass runs."""
        if self.search is None:
            return self
        names = [p.name for p in self.passes]
        if self.search.pass_ not in names:
            raise ValueError(f"search.pass '{self.search.pass_}' is not one of the listed passes ({', '.join(names) or 'none'})")
        step = self.passes[names.index(self.search.pass_)]
        model = type(step.settings)
        if self.search.field not in model.model_fields:
            raise ValueError(f"search.field '{self.search.field}' is not a setting of pass '{step.name}' "
                             f"(expected one of: {', '.join(model.model_fields)})")
        for j, value in enumerate(self.search.values):
            try:
                model.model_validate({**step.settings.model_dump(exclude_unset=True), self.search.field: value})
            except ValueError as e:
                first = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
                raise ValueError(f"search.values.{j} ({self.search.field}: {value!r}): {first}") from e
        return self

    def variant(self, index: int, field: str, value: Any):
        """The step at ``index`` with one setting changed (validated): what search tries."""
        step = self.passes[index]
        settings = type(step.settings).model_validate({**step.settings.model_dump(exclude_unset=True), field: value})
        return type(step)(**{step.name: settings})
