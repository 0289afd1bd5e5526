"""The project manifest (projects/<app>/project.yaml): ``Project`` and its sections."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from kiln.schema.base import Strict
from kiln.schema.compression import Compression
from kiln.schema.datasets import Dataset, dataset_class_names
from kiln.schema.nets import Architecture
from kiln.schema.tasks import Anomaly, Detection, Regression, label_kind_problem, task_for


# --- project manifest -------------------------------------------------------------------------


class MinLimit(Strict):
    min: float = Field(ge=0.0, le=1.0, description="lowest acceptable value")


class MaxLimit(Strict):
    max: float = Field(gt=0, description="highest acceptable value, in the label's units")


class LatencyLimit(Strict):
    p50_max: float | None = Field(None, gt=0, description="highest acceptable median, ms")
    p99_max: float | None = Field(None, gt=0, description="highest acceptable 99th percentile, ms")


class SizeLimit(Strict):
    max: float = Field(gt=0, description="largest acceptable kernel library, KiB")


class MemoryLimit(Strict):
    max: float = Field(gt=0, description="highest acceptable peak memory on the board, KiB")


def _names_as_str(v: Any) -> Any:
    """A mapping keyed by class name: YAML reads `{0: ...}` as an int, a class index named as the
    formats without class names (gtsrb, digits, synthetic) name their classes."""
    if isinstance(v, dict):
        return {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: w for k, w in v.items()}
    return v


Unit = Annotated[float, Field(ge=0.0, le=1.0)]


class ClassRecall(Strict):
    """Classification: the lowest acceptable recall (the share of a class's test samples the board
    predicts as that class: its per-class accuracy) of every class, or of the named ones."""

    min: float | None = Field(None, ge=0.0, le=1.0, description="lowest acceptable recall of every class")
    per_class: dict[str, Unit] | None = Field(
        None, description="lowest acceptable recall of the named classes, class name -> min (overrides min for "
        "them; formats without class names name them by index: '0', '1', ...)")

    @field_validator("per_class", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        return _names_as_str(v)

    @model_validator(mode="after")
    def _something(self) -> ClassRecall:
        if self.min is None and not self.per_class:
            raise ValueError("give min (every class) or per_class (class name -> min), or leave class_recall out")
        return self


class Requirements(Strict):
    """Checked on every board, per board, by the host (the board never decides)."""

    accuracy: MinLimit | None = None
    latency_ms: LatencyLimit | None = None
    model_kb: SizeLimit | None = None
    memory_kb: MemoryLimit | None = Field(
        None, description="peak memory of the app on the board (the runner's peak resident set less the test "
        "inputs it holds), KiB; not enforced on emulated boards (qemu's resident set is not the board's)"
    )
    agreement: MinLimit | None = Field(
        None, description="min share of test predictions equal to the reference board's"
    )
    auc: MinLimit | None = Field(
        None, description="anomaly detection: min area under the ROC curve of the reconstruction error "
        "on the test set (normal against anomalous samples), on the board"
    )
    macro_f1: MinLimit | None = Field(
        None, description="classification: min macro-F1 (the mean over classes of each class's F1) of the board's "
        "test predictions"
    )
    class_recall: ClassRecall | None = Field(
        None, description="classification: min recall (per-class accuracy) of every class, or of the named ones, "
        "on the board's test predictions; a miss names the class"
    )
    mae: MaxLimit | None = Field(None, description="regression: max mean absolute error of the board's test "
                                 "predictions (de-standardized by the host), in the label's units")
    rmse: MaxLimit | None = Field(None, description="regression: max root mean squared error of the board's test "
                                  "predictions, in the label's units")
    f1: MinLimit | None = Field(None, description="detection: min F1 of the object centres the host decodes from the "
                                "board's heat maps (over all classes), matched within detection.match_distance")
    precision: MinLimit | None = Field(None, description="detection: min precision of the decoded object centres")
    recall: MinLimit | None = Field(None, description="detection: min recall of the test objects' centres")


class Sizing(Strict):
    """The estimate of every target made when the manifest loads (kiln/sizing.py), before any
    data or training work: a design that cannot meet latency_ms.p50_max, memory_kb.max or the
    board's RAM on some target is refused (refuse) or logged and recorded (warn)."""

    on_violation: Literal["refuse", "warn"] = Field(
        "refuse", description="refuse: the manifest does not load; warn: logged once per board, recorded in the report"
    )


class EarlyStopping(Strict):
    """Stop when the validation metric has not improved for ``patience`` epochs (the best
    epoch's weights are kept either way)."""

    patience: int = Field(ge=1, le=1000, description="epochs without a better validation figure before stopping")
    min_delta: float = Field(0.0, ge=0, le=1, description="an improvement smaller than this does not count")


Weight = Annotated[float, Field(gt=0.0, le=1e6)]


class Distributed(Strict):
    """training.distributed: data-parallel training (torch DDP) launched with torchrun by the
    train task (passes/support/distributed.py)."""

    nproc_per_node: int = Field(2, ge=1, le=64, description="processes on each machine (one per GPU on CUDA)")
    nnodes: int = Field(1, ge=1, le=1024, description="machines; above 1 the others join with "
                        "`python -m passes.support.distributed join <app>` and the same rdzv_endpoint")
    rdzv_endpoint: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.:\[\]-]+:\d{1,5}$",
        description="host:port of the c10d rendezvous (the machine running the train task); required when "
        "nnodes > 1; unset on one machine: torchrun --standalone")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU")
    timeout_s: float = Field(1800, gt=0, description="how long the rendezvous waits for every machine")

    @model_validator(mode="after")
    def _endpoint(self) -> "Distributed":
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"rdzv_endpoint: required with nnodes {self.nnodes} (host:port every machine reaches)")
        return self


def cuda_devices() -> int:
    """How many CUDA devices torch sees (imported only for a manifest that names CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class Training(Strict):
    epochs: int = Field(ge=1, le=1000)
    batch: int = Field(128, ge=1, le=8192)
    lr: float = Field(gt=0, le=10)
    seed: int = 0
    threads: int = Field(2, ge=1, le=256)
    class_weights: Literal["balanced"] | list[Weight] | dict[str, Weight] | None = Field(
        None, description="classification: per-class weights of the cross-entropy. balanced: inverse class "
        "frequency on the training split (n_samples / (n_classes * count), scikit-learn's); a list: one weight per "
        "class, in class order; a mapping: class name -> weight (classes not named weigh 1). Unset: every class alike"
    )
    schedule: Literal["one_cycle", "cosine", "constant"] = Field(
        "one_cycle", description="learning-rate schedule over all steps: one_cycle (warm up to lr, then anneal), "
        "cosine (from lr down to 0), constant (lr throughout)")
    weight_decay: float = Field(0.0, ge=0, le=1, description="decoupled weight decay (AdamW) when above 0; 0: Adam")
    early_stopping: EarlyStopping | None = Field(None, description="stop on the validation metric; unset: train "
                                                 "every epoch")
    device: str = Field("auto", description="auto (CUDA when torch sees it, else cpu), cpu, cuda or cuda:N; "
                        "mixed precision (autocast + GradScaler) on CUDA")
    loader_workers: int | Literal["auto"] = Field(
        "auto", description="background processes loading batches (torch DataLoader); auto: 0 on cpu (the step and "
        "the loading share the same cores), min(4, cores - 1) on CUDA")
    distributed: Distributed | None = Field(None, description="data-parallel training over processes and machines "
                                            "(torchrun, DDP); unset: one process")
    warm_start: int | None = Field(
        None, ge=1, le=1000, description="epochs: when only the data changed since the last train, fine-tune the "
        "last model.pt for this many epochs instead of training from scratch (`doit forget train:<app>` then "
        "`doit train:<app>` retrains from scratch)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", v)
        if m is None:
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {v!r}")
        if v.startswith("cuda"):
            have, want = cuda_devices(), int(m.group(1) or 0)
            if have == 0:
                raise ValueError(f"{v!r} asked, but torch sees no CUDA device on this machine (use auto or cpu)")
            if want >= have:
                raise ValueError(f"{v!r} asked, but torch sees {have} CUDA device(s): cuda:0..cuda:{have - 1}")
        return v

    @field_validator("class_weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "balanced":
            raise ValueError(f"expected 'balanced', a list of weights (one per class) or a mapping class name -> "
                             f"weight, got {v!r}")
        return _names_as_str(v)


class Validation(Strict):
    samples: int | None = Field(None, ge=1, description="test samples sent to each board")
    warmup: int = Field(10, ge=0)
    timeout_s: float = Field(900, gt=0)


class Tuning(Strict):
    """MetaSchedule tuning of the kernel libraries (passes/tune.py)."""

    trials: int | None = Field(
        None, ge=0, description="trial budget per board type for this model; unset: the board type's tune_trials"
    )
    measure: Literal["auto", "native", "rpc"] = Field(
        "auto", description="where candidates are timed: native (on this machine, for a board type whose code runs "
        "here; auto is the same), or rpc (on every SSH instance of the board type in the lab, over TVM RPC through "
        "kiln-runner --rpc-serve; qemu-emulated instances are skipped); $KILN_TUNE_MEASURE overrides it"
    )

class Project(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    requirements: Requirements
    dataset: Dataset
    architecture: Architecture
    training: Training
    compression: Compression = Field(default_factory=Compression)
    validation: Validation = Field(default_factory=Validation)
    tuning: Tuning = Field(default_factory=Tuning)
    sizing: Sizing = Field(default_factory=Sizing)
    anomaly: Anomaly | None = Field(None, description="anomaly detection (a reconstruction objective): "
                                    "which classes are normal; required for, and only for, that objective")
    regression: Regression | None = Field(None, description="regression: the net (a classification family, one "
                                          "output) predicts the dataset's numeric label; its loss")
    detection: Detection | None = Field(None, description="object detection (family fomo): the heat map's "
                                        "threshold, merge radius, match distance and object weight")
    targets: list[str] = Field(min_length=1, description="board types from targets/*.yaml")

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a board type is listed twice")
        return v

    @property
    def objective(self) -> str:
        """The net's objective: "classification" or "reconstruction" (a field of family module,
        else the family's class variable); "regression" for a classification family with a
        ``regression`` section."""
        objective = getattr(self.architecture, "objective", "classification")
        return "regression" if objective == "classification" and self.regression is not None else objective

    def normal_indices(self) -> list[int]:
        """The labels of the normal classes of an anomaly-detection app (ValueError naming the
        field when a name is unknown or the classes are not known yet)."""
        if self.anomaly is None:
            raise ValueError("anomaly.normal: not set (the app is not an anomaly detector)")
        names = dataset_class_names(self.dataset)
        if names is None:
            raise ValueError("anomaly.normal: the dataset's classes are not known yet (kiln.config infers them)")
        return self.anomaly.indices(names)

    @property
    def task(self):
        """The task's settings (kiln/schema/tasks.py): chosen by the net's objective; its
        settings are the manifest's section for it (``anomaly``), if it has one."""
        cls = task_for(self.objective)
        return cls() if cls.section is None else getattr(self, cls.section)

    @model_validator(mode="after")
    def _task_fits(self) -> Project:
        """Each task gets only its own settings, refused when the manifest loads: anomaly
        detection (a reconstruction objective) needs ``anomaly.normal`` and is judged by
        ``requirements.auc``; a classifier by ``requirements.accuracy`` (each task's ``missing``
        and ``refuses``). The task then checks what only the whole manifest tells (the normal
        class names against the data's classes, when they are known)."""
        cls, family = task_for(self.objective), self.architecture.family
        problem = label_kind_problem(self)
        if problem:
            raise ValueError(problem)
        if cls.section is not None and getattr(self, cls.section) is None:
            raise ValueError(cls.missing.replace("{family}", family))
        for path, why in cls.refuses.items():
            value = self
            for part in path.split("."):
                value = getattr(value, part)
            if value is not None:
                raise ValueError(why.replace("{family}", family))
        self.task.check(self)
        return self

    @model_validator(mode="after")
    def _family_can_take_passes(self) -> Project:
        """A compression pass the net family cannot take (its ``refuses``: a pass name, or
        "pass.method") is refused when the manifest loads, with the family's reason, not after
        training when the pass would fail."""
        refuses = getattr(type(self.architecture), "refuses", {})
        for i, step in enumerate(self.compression.passes):
            method = getattr(step.settings, "method", None)
            for key in (step.name, f"{step.name}.{method}" if method is not None else None):
                if key is not None and key in refuses:
                    raise ValueError(f"compression.passes.{i}.{step.name}: family '{self.architecture.family}' "
                                     f"cannot take {key}: {refuses[key]}")
        return self
