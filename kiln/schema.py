"""Every pydantic model of Kiln: the project manifest, board types and the lab inventory.

YAML files hold instances only; this module is the truth. ``doit schema`` exports the JSON
Schema of the manifest, board files and lab inventories so editors complete every field.

Extension axes are discriminated unions: dataset formats (``Dataset``, by ``format``), net
families (``Architecture``, by ``family``), compression passes (``CompressionStep``, by the
pass's name), transports (``Transport``, by ``kind``) and lab backends (``Lab``, by
``backend``). Each member is one registry entry: its ``implementation`` names the module that
does the work, which ``kiln.registry`` imports when the work runs. The core names those modules
and never imports them, so layers stay one-way and ``doit list`` imports no torch or TVM.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, PrivateAttr, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationInfo, field_validator,
                      model_validator)


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a manifest must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


# --- project manifest -------------------------------------------------------------------------


class MinLimit(Strict):
    min: float = Field(ge=0.0, le=1.0, description="lowest acceptable value")


class LatencyLimit(Strict):
    p50_max: float | None = Field(None, gt=0, description="highest acceptable median, ms")
    p99_max: float | None = Field(None, gt=0, description="highest acceptable 99th percentile, ms")


class SizeLimit(Strict):
    max: float = Field(gt=0, description="largest acceptable kernel library, KiB")


class MemoryLimit(Strict):
    max: float = Field(gt=0, description="highest acceptable peak memory on the board, KiB")


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


class Sizing(Strict):
    """The estimate of every target made when the manifest loads (kiln/sizing.py), before any
    data or training work: a design that cannot meet latency_ms.p50_max, memory_kb.max or the
    board's RAM on some target is refused (refuse) or logged and recorded (warn)."""

    on_violation: Literal["refuse", "warn"] = Field(
        "refuse", description="refuse: the manifest does not load; warn: logged once per board, recorded in the report"
    )


class Synthetic(Strict):
    per_class: int = Field(200, ge=1, le=10_000)
    test_per_class: int = Field(40, ge=1, le=10_000)
    seed: int = 0


GROUP_RULES = ("file", "recording", "speaker", "none")


class Split(Strict):
    """How the data set is split. Whole *groups* go to one split, never a sample at a time, so
    overlapping windows of one recording, clips of one speaker or crops of one image never sit
    in both train and test (stratified by class where the groups allow)."""

    val: float = Field(0.1, gt=0, lt=0.5)
    test: float = Field(0.1, gt=0, lt=0.5, description="used only when no test set ships")
    seed: int = 0
    group_by: str | None = Field(
        None, description="what a group is: 'recording' or 'file' (every sample cut from one source file), "
        "'speaker' (Speech Commands' <speaker>_nohash_<n> file names; others: the file), 'none' (every sample "
        "its own group: leaks when samples share a source; warned), or a regular expression searched in each "
        "sample's file path relative to dataset.path (the group is its first capture group, else the match; "
        "a path it does not match is its own group). Unset: the format's default (csv_windows: recording, "
        "audio_folders: speaker, gtsrb: the track, other file formats: file)")

    @field_validator("group_by")
    @classmethod
    def _rule(cls, v: str | None) -> str | None:
        if v is None or v in GROUP_RULES:
            return v
        try:
            rx = re.compile(v)
        except re.error as e:
            raise ValueError(f"{v!r} is neither one of {', '.join(GROUP_RULES)} nor a regular expression ({e})") from e
        if rx.groups > 1:
            raise ValueError(f"the regular expression {v!r} has {rx.groups} capture groups; use at most one "
                             "(the group name) or (?:...) for the others")
        return v


class Augment(Strict):
    rotate_deg: float = Field(0.0, ge=0, le=45)
    brightness: float = Field(0.0, ge=0, le=1)
    blur: float = Field(0.0, ge=0, le=1, description="probability of a 3x3 blur")


class _DatasetBase(Strict):
    """What every dataset format has: the split and the online augmentation. Every format also
    answers ``channels``, ``image_size`` (the net's C and (H, W)) and ``num_classes``: class
    variables, fields, or (formats whose net input comes out of a front end) properties."""

    implementation: ClassVar[str]
    # the raw sample's layout as the board receives it: image (H, W, C) uint8, audio (L,)
    # int16, sequence (L, C) float32, table (F,) float32 (passes/frontends/ maps each to C x H x W)
    layout: ClassVar[str] = "image"
    channels: ClassVar[int]
    num_classes: ClassVar[int]

    split: Split = Field(default_factory=Split)
    augment: Augment = Field(default_factory=Augment)


class _ImageDataset(_DatasetBase):
    """A format of images: the net's input size is a field, images are resized to it."""

    image_size: tuple[int, int] = Field((32, 32), description="(height, width) of the model's input; a 1-D "
                                        "sequence of length L is (1, L), a feature vector of F values (1, F)")

    @field_validator("image_size")
    @classmethod
    def _size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= s <= 1024 for s in v):
            raise ValueError("each side must be between 1 and 1024")
        return v

    def raw_shape(self) -> tuple[int, ...]:
        """One raw sample as the board gets it with a front end: (H, W, C) uint8 pixels."""
        return (*self.image_size, self.channels)


# The images' optional front end (gtsrb, digits, synthetic; image_folders says the same): with it
# the board is fed uint8 pixels, a quarter of float32's bytes (what a slow serial link carries).
_IMAGE_FRONT_END = ("in the library (board fed uint8 pixels, 4x fewer bytes than float32); unset: the "
                    "host scales pixels to [0, 1] and the board is fed float32")


class GtsrbDataset(_ImageDataset):
    """The GTSRB on-disk layout (RGB, 43 classes): passes/formats/gtsrb.py."""

    implementation: ClassVar[str] = "passes.formats.gtsrb"
    channels: ClassVar[int] = 3
    num_classes: ClassVar[int] = 43

    format: Literal["gtsrb"]
    path: str = Field(description="the GTSRB tree (Final_Training/Images/...); relative paths are relative to the repo")
    synthetic: Synthetic | None = Field(
        default_factory=Synthetic, description="generated under build/ when path holds no GTSRB tree; null: never"
    )
    front_end: NormalizeFrontEnd | None = Field(None, description=_IMAGE_FRONT_END)


class DigitsDataset(_ImageDataset):
    """scikit-learn's digits.csv.gz format (8x8 grayscale, 10 classes): passes/formats/digits.py."""

    implementation: ClassVar[str] = "passes.formats.digits"
    channels: ClassVar[int] = 1
    num_classes: ClassVar[int] = 10

    format: Literal["digits"]
    path: str = Field("sklearn", description="'sklearn' (the real set scikit-learn ships) or a digits.csv(.gz) file; "
                      "relative paths are relative to the repo")
    front_end: NormalizeFrontEnd | None = Field(None, description=_IMAGE_FRONT_END)


class SyntheticDataset(_ImageDataset):
    """A generated, learnable data set of any shape: per class a random template, per sample
    the template plus noise (passes/formats/synthetic.py). For apps whose sensor or audio data
    does not exist yet, and for tests at the shape of a real app (49x10 features, 640 values)."""

    implementation: ClassVar[str] = "passes.formats.synthetic"

    format: Literal["synthetic"]
    channels: int = Field(1, ge=1, le=64, description="input channels (C of C x H x W)")
    classes: int = Field(2, le=1000, description="number of classes (at least two: a classifier of one class "
                         "is right whatever it says)")
    per_class: int = Field(200, ge=1, le=10_000, description="training samples per class (val split off these)")
    test_per_class: int = Field(40, ge=1, le=10_000, description="test samples per class")
    seed: int = 0
    front_end: NormalizeFrontEnd | None = Field(None, description=_IMAGE_FRONT_END)

    @field_validator("classes")
    @classmethod
    def _two_classes(cls, v: int) -> int:
        if v < 2:  # the own-data formats refuse a data set of one class in the same words
            raise ValueError(f"{v} class(es); a classifier needs at least two classes")
        return v

    @property
    def num_classes(self) -> int:
        return self.classes


# --- front ends: raw samples -> the net's C x H x W input, inside the kernel library ----------


class _FrontEndBase(Strict):
    """A front end runs inside the kernel library: the board is fed raw samples (int16 audio,
    uint8 pixels, raw sensor values) and the library computes the features. The host computes
    the same features with the same graph for training (passes/frontends/)."""

    implementation: ClassVar[str]
    layouts: ClassVar[tuple[str, ...]]  # raw layouts it takes (see _DatasetBase.layout)

    def output_shape(self, layout: str, raw_shape: tuple[int, ...], sample_rate: float | None = None
                     ) -> tuple[int, int, int]:
        raise NotImplementedError

    def cost(self, layout: str, raw_shape: tuple[int, ...], sample_rate: float | None = None) -> tuple[int, int]:
        """(float32 constants, multiply-accumulates) per sample, for kiln/sizing.py: the front end
        runs in float inside the library, also in an int8 one."""
        c, h, w = self.output_shape(layout, raw_shape, sample_rate)
        return 0, c * h * w


class _SpectralFrontEnd(_FrontEndBase):
    """Framed power spectrum -> mel bands -> log, as matmuls against fixed bases (TVM's ONNX
    frontend has no STFT or DFT). Defaults are MLPerf Tiny keyword spotting's: 30 ms windows
    every 20 ms, a 512-point FFT, 40 mel bands from 20 to 4000 Hz (49 frames per second at 16 kHz).
    int16 values scaled by 1/32768, periodic Hann window, power spectrum (re^2 + im^2), HTK mel
    triangles of peak 1 (tf.signal's), no padding: passes/frontends/spectral.py."""

    layouts: ClassVar[tuple[str, ...]] = ("audio",)
    window_ms: float = Field(30.0, gt=0, le=1000, description="analysis window (Hann), ms")
    hop_ms: float = Field(20.0, gt=0, le=1000, description="hop between windows, ms")
    fft: int = Field(512, ge=16, le=4096, description="FFT points (at least the window's samples)")
    mels: int = Field(40, ge=1, le=256, description="mel bands")
    fmin: float = Field(20.0, ge=0, description="lowest mel band edge, Hz")
    fmax: float = Field(4000.0, gt=0, description="highest mel band edge, Hz (at most half the sample rate)")
    log_offset: float = Field(1e-6, gt=0, description="log(mel energy + log_offset)")

    @model_validator(mode="after")
    def _bands(self):
        if self.fmax <= self.fmin:
            raise ValueError(f"fmax ({self.fmax}) must be above fmin ({self.fmin})")
        return self

    def window(self, sample_rate: float) -> tuple[int, int]:
        """(window, hop) in samples."""
        return round(sample_rate * self.window_ms / 1000), max(1, round(sample_rate * self.hop_ms / 1000))

    def frames(self, length: int, sample_rate: float) -> int:
        win, hop = self.window(sample_rate)
        if win > length:
            raise ValueError(f"a {self.window_ms} ms window ({win} samples) is longer than the clip ({length} samples)")
        if win > self.fft:
            raise ValueError(f"fft ({self.fft}) must be at least the window's {win} samples")
        if self.fmax > sample_rate / 2:
            raise ValueError(f"fmax ({self.fmax} Hz) is above half the sample rate ({sample_rate / 2:g} Hz)")
        return 1 + (length - win) // hop

    def bins(self) -> int:
        return self.mels

    def cost(self, layout, raw_shape, sample_rate=None):
        """The DFT over the FFT bins a mel band can use (fmin to fmax), the power, the mel
        matmul and, for MFCC, the DCT (an estimate: passes/frontends/spectral.py drops the bins
        whose mel weights are all zero)."""
        win, _ = self.window(sample_rate)
        frames = self.frames(raw_shape[0], sample_rate)
        step = sample_rate / self.fft
        nbins = min(self.fft // 2, int(self.fmax / step) + 1) - int(self.fmin / step) + 1
        dct = self.mels * self.coefficients if hasattr(self, "coefficients") else 0
        consts = 2 * win * nbins + nbins * self.mels + dct
        return consts, frames * (2 * win * nbins + 2 * nbins + nbins * self.mels + dct)


class MfccFrontEnd(_SpectralFrontEnd):
    """Log-mel energies, then a DCT-II (orthonormal) to ``coefficients`` cepstral coefficients:
    passes/frontends/mfcc.py. Output 1 x frames x coefficients."""

    implementation: ClassVar[str] = "passes.frontends.mfcc"
    kind: Literal["mfcc"]
    coefficients: int = Field(10, ge=1, le=256, description="DCT coefficients kept (at most mels)")

    @model_validator(mode="after")
    def _coefficients(self):
        if self.coefficients > self.mels:
            raise ValueError(f"coefficients ({self.coefficients}) must be at most mels ({self.mels})")
        return self

    def bins(self) -> int:
        return self.coefficients

    def output_shape(self, layout, raw_shape, sample_rate=None):
        return (1, self.frames(raw_shape[0], sample_rate), self.coefficients)


class LogmelFrontEnd(_SpectralFrontEnd):
    """Log-mel energies: passes/frontends/logmel.py. Output 1 x frames x mels."""

    implementation: ClassVar[str] = "passes.frontends.logmel"
    kind: Literal["logmel"]

    def output_shape(self, layout, raw_shape, sample_rate=None):
        return (1, self.frames(raw_shape[0], sample_rate), self.mels)


class NormalizeFrontEnd(_FrontEndBase):
    """(x * scale - mean) / std per channel: passes/frontends/normalize.py. Pixels (uint8, scale
    1/255 by default), sensor values and table features; mean and std are fitted on the
    training split when not given (a fitted std under 1e-6, a constant channel, is taken as 1).
    Output: an image's C x H x W, a sequence's C x 1 x L, a table's 1 x 1 x F."""

    implementation: ClassVar[str] = "passes.frontends.normalize"
    layouts: ClassVar[tuple[str, ...]] = ("image", "sequence", "table")
    kind: Literal["normalize"]
    scale: float | None = Field(None, gt=0, description="multiplies the raw value first; unset: 1/255 for "
                                "pixels, 1 otherwise")
    mean: list[float] | None = Field(None, description="per channel (per feature for a table); unset: fitted")
    std: list[float] | None = Field(None, description="per channel (per feature for a table); unset: fitted")

    @field_validator("std")
    @classmethod
    def _positive(cls, v):
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every std must be positive")
        return v

    def output_shape(self, layout, raw_shape, sample_rate=None):
        if layout == "image":
            h, w, c = raw_shape
            return (c, h, w)
        if layout == "sequence":
            length, c = raw_shape
            return (c, 1, length)
        return (1, 1, raw_shape[0])


FrontEnd = Annotated[Union[MfccFrontEnd, LogmelFrontEnd, NormalizeFrontEnd], Field(discriminator="kind")]


# --- formats of a team's own data ----------------------------------------------------------------


def _class_names(v: list[str] | None) -> list[str] | None:
    if v is None:
        return v
    if len(v) < 2:
        raise ValueError("list at least two classes (a classifier of one class learns nothing)")
    if len(set(v)) != len(v):
        raise ValueError("a class is listed twice")
    return v


class _OwnData(Strict):
    """What the formats of a team's own data share: where it is, the classes, the front end."""

    path: str = Field(description="the data's root; relative paths are relative to the repo")
    classes: list[str] | None = Field(None, description="class names in output order; unset: inferred from "
                                      "the data (sorted)")
    # set by kiln/config.py when the manifest loads and the classes (or a table's features)
    # are inferred from the data (the format module's ``infer``)
    _inferred: dict = PrivateAttr(default_factory=dict)

    _classes = field_validator("classes")(classmethod(lambda cls, v: _class_names(v)))

    @property
    def class_names(self) -> list[str] | None:
        return self.classes or self._inferred.get("classes")

    @property
    def num_classes(self) -> int:
        names = self.class_names
        if names is None:
            raise ValueError("the classes are not known before the data is read (kiln.config infers them)")
        return len(names)

    def raw_shape(self) -> tuple[int, ...]:
        raise NotImplementedError


class _FrontEndShaped(_OwnData):
    """A format whose net input is what its front end makes of the raw sample."""

    def _net_shape(self) -> tuple[int, int, int]:
        return self.front_end.output_shape(self.layout, self.raw_shape(), getattr(self, "sample_rate", None))

    @property
    def channels(self) -> int:
        return self._net_shape()[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self._net_shape()[1:])


class FolderSynthetic(Strict):
    """A deterministic synthetic data set written in the format's own on-disk layout under
    build/<app>/ (when ``path`` holds no data), so the default run needs no download."""

    classes: int = Field(4, ge=2, le=100)
    per_class: int = Field(100, ge=1, le=10_000, description="training samples (or recordings) per class")
    test_per_class: int = Field(30, ge=1, le=10_000)
    seed: int = 0


class ImageFoldersDataset(_ImageDataset, _OwnData):
    """``<root>/<class>/*.png|jpg|jpeg|ppm|bmp`` (or ``<root>/{train,val,test}/<class>/...``),
    RGB or grayscale, resized to ``image_size``: passes/formats/image_folders.py."""

    implementation: ClassVar[str] = "passes.formats.image_folders"
    format: Literal["image_folders"]
    color: Literal["rgb", "grayscale"] = "rgb"
    front_end: NormalizeFrontEnd | None = Field(None, description="in the library (board fed uint8 pixels); "
                                                "unset: the host scales pixels to [0, 1] and the board is fed float32")
    synthetic: FolderSynthetic | None = Field(default_factory=FolderSynthetic,
                                              description="generated under build/ when path holds no images; null: never")

    def raw_shape(self) -> tuple[int, ...]:
        return (*self.image_size, 3 if self.color == "rgb" else 1)

    @property
    def channels(self) -> int:
        return 3 if self.color == "rgb" else 1


class AudioFoldersDataset(_FrontEndShaped, _DatasetBase):
    """``<root>/<class>/*.wav`` (or with train/ val/ test/ above the classes), 16-bit PCM mono
    at ``sample_rate``; clips padded or cut to ``clip_seconds``: passes/formats/audio_folders.py.
    The board is fed the raw int16 samples; the front end (MFCC by default) runs in the library."""

    implementation: ClassVar[str] = "passes.formats.audio_folders"
    layout: ClassVar[str] = "audio"
    format: Literal["audio_folders"]
    sample_rate: int = Field(16000, ge=1000, le=192_000, description="Hz; a clip at another rate is reported")
    clip_seconds: float = Field(1.0, gt=0, le=60, description="shorter clips are zero-padded, longer cut")
    front_end: Annotated[Union[MfccFrontEnd, LogmelFrontEnd], Field(discriminator="kind")] = Field(
        default_factory=lambda: MfccFrontEnd(kind="mfcc"))
    synthetic: FolderSynthetic | None = Field(default_factory=FolderSynthetic,
                                              description="keyword-like clips generated under build/ when path holds none")

    @model_validator(mode="after")
    def _fits(self):
        try:
            self.front_end.frames(self.raw_shape()[0], self.sample_rate)
        except ValueError as e:
            raise ValueError(f"front_end: {e}") from e
        return self

    def raw_shape(self) -> tuple[int, ...]:
        return (max(1, round(self.sample_rate * self.clip_seconds)),)


class CsvWindowsDataset(_FrontEndShaped, _DatasetBase):
    """Time-series CSV files (a timestamp column, named channel columns, a label column; or,
    with ``label: null``, one folder or file per class) cut into windows of ``window`` samples
    every ``stride``: passes/formats/csv_windows.py. The board is fed the raw values."""

    implementation: ClassVar[str] = "passes.formats.csv_windows"
    layout: ClassVar[str] = "sequence"
    format: Literal["csv_windows"]
    columns: list[str] = Field(min_length=1, description="the channel columns, in input order")
    timestamp: str | None = Field("timestamp", description="the timestamp column (seconds); null: none")
    label: str | None = Field("label", description="the label column; null: one folder <root>/<class>/ "
                              "(or file <root>/<class>.csv) per class")
    sample_rate: float = Field(gt=0, le=1_000_000, description="Hz; timestamps that disagree are reported")
    window: int = Field(ge=2, le=100_000, description="samples per window")
    stride: int = Field(ge=1, le=100_000, description="samples between window starts")
    front_end: NormalizeFrontEnd = Field(default_factory=lambda: NormalizeFrontEnd(kind="normalize"))
    synthetic: FolderSynthetic | None = Field(
        default_factory=lambda: FolderSynthetic(classes=4, per_class=40, test_per_class=12),
        description="a three-axis accelerometer recording generated under build/ when path holds none "
        "(per_class: windows' worth of recording per class)")

    def raw_shape(self) -> tuple[int, ...]:
        return (self.window, len(self.columns))


class CsvTableDataset(_FrontEndShaped, _DatasetBase):
    """One row per sample: feature columns and a label column, in one CSV file (``path``) or in
    ``train.csv`` / ``val.csv`` / ``test.csv`` under it: passes/formats/csv_table.py."""

    implementation: ClassVar[str] = "passes.formats.csv_table"
    layout: ClassVar[str] = "table"
    format: Literal["csv_table"]
    features: list[str] | None = Field(None, description="feature columns, in input order; unset: every "
                                       "column but the label")
    label: str = "label"
    front_end: NormalizeFrontEnd = Field(default_factory=lambda: NormalizeFrontEnd(kind="normalize"))
    synthetic: FolderSynthetic | None = Field(default_factory=lambda: FolderSynthetic(classes=3, per_class=200),
                                              description="a table generated under build/ when path holds none")

    @property
    def feature_names(self) -> list[str] | None:
        return self.features or self._inferred.get("features")

    def raw_shape(self) -> tuple[int, ...]:
        names = self.feature_names
        if names is None:
            raise ValueError("the feature columns are not known before the table is read (kiln.config infers them)")
        return (len(names),)


Dataset = Annotated[Union[GtsrbDataset, DigitsDataset, SyntheticDataset, ImageFoldersDataset, AudioFoldersDataset,
                          CsvWindowsDataset, CsvTableDataset], Field(discriminator="format")]


def _check_widths(v: list[int], what: str = "width") -> list[int]:
    if any(w < 1 or w > 1024 for w in v):
        raise ValueError(f"each {what} must be between 1 and 1024")
    return v


class _ArchitectureBase(Strict):
    """What every net family declares. Class variables, read by the stages and the loader:

    * ``implementation``: the module with ``estimate``/``build`` (kiln/nets/);
    * ``objective``: "classification" (cross-entropy, accuracy) or "reconstruction" (MSE
      between the output and the flattened input: autoencoders); family module sets it per
      manifest (a field), so read it on the instance: ``arch.objective``;
    * ``trains``: false for a model Kiln does not train (family onnx: imported, post-training
      compression only);
    * ``analytic``: whether ``estimate`` is pure Python; false where it must build the model
      (family module, onnx), so the manifest loader does not estimate it and the train or
      import stage checks ``max_macs`` on the build;
    * ``refuses``: compression pass name, or "pass.method" (e.g. "prune.structured"), -> why
      this family cannot take it; a manifest listing it is refused when it loads.
    """

    implementation: ClassVar[str]
    trains: ClassVar[bool] = True
    analytic: ClassVar[bool] = True
    refuses: ClassVar[dict[str, str]] = {}

    max_macs: int | None = Field(None, gt=0, description="complexity budget (MACs per inference), checked before training")


class _FamilyBase(_ArchitectureBase):
    """A family whose objective is fixed (a class variable; family module has it as a field)."""

    objective: ClassVar[str] = "classification"


class CnnArchitecture(_FamilyBase):
    """Conv3x3-BN-ReLU-maxpool stages, then a linear head: kiln/nets/cnn.py."""

    implementation: ClassVar[str] = "kiln.nets.cnn"

    family: Literal["cnn"]
    widths: list[int] = Field(min_length=1, max_length=8)
    head: Literal["gap", "flatten"] = "gap"
    max_macs: int = Field(gt=0, description="complexity budget, checked before training")

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        return _check_widths(v, "width")


class DsCnnArchitecture(_FamilyBase):
    """A first conv (kernel, stride), then depthwise-separable blocks (depthwise 3x3-BN-ReLU,
    pointwise 1x1-BN-ReLU), global average pool, linear: kiln/nets/ds_cnn.py (Hello Edge's
    DS-CNN for keyword spotting)."""

    implementation: ClassVar[str] = "kiln.nets.ds_cnn"

    family: Literal["ds_cnn"]
    filters: int = Field(64, ge=1, le=1024, description="output channels of the first conv")
    kernel: tuple[int, int] = Field((3, 3), description="first conv's kernel (height, width)")
    stride: tuple[int, int] = Field((1, 1), description="first conv's stride (height, width)")
    widths: list[int] = Field(min_length=1, max_length=16, description="pointwise channels of each block")
    strides: list[int] | None = Field(None, description="depthwise stride of each block (1 or 2); unset: all 1")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the head (training only)")
    stem_dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the first conv (training only)")

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        return _check_widths(v)

    @field_validator("kernel", "stride")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= s <= 64 for s in v):
            raise ValueError("each side must be between 1 and 64")
        return v

    @field_validator("strides")
    @classmethod
    def _strides(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        widths = info.data.get("widths")
        if v is not None:
            if widths is not None and len(v) != len(widths):
                raise ValueError(f"{len(v)} entries, expected one per block ({len(widths)})")
            if any(s not in (1, 2) for s in v):
                raise ValueError("each stride must be 1 or 2")
        return v


class MobilenetV1Architecture(_FamilyBase):
    """MobileNetV1: a 3x3 stride-2 conv, then the paper's 13 depthwise-separable blocks, widths
    scaled by ``alpha``, global average pool, linear: kiln/nets/mobilenet_v1.py."""

    implementation: ClassVar[str] = "kiln.nets.mobilenet_v1"

    family: Literal["mobilenet_v1"]
    alpha: float = Field(1.0, gt=0, le=4, description="width multiplier (0.25 for MLPerf Tiny's visual wake words)")
    blocks: int = Field(13, ge=1, le=13, description="how many of the 13 depthwise-separable blocks (a shallower net)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the head (training only)")


class ResnetArchitecture(_FamilyBase):
    """A 3x3 stem conv, then stages of basic residual blocks (conv3x3-BN-ReLU-conv3x3-BN plus the
    shortcut, then ReLU; the first block of every stage after the first has stride 2, and a 1x1
    conv shortcut where the shape changes), global average pool, linear: kiln/nets/resnet.py."""

    implementation: ClassVar[str] = "kiln.nets.resnet"

    family: Literal["resnet"]
    stem: int = Field(16, ge=1, le=1024, description="channels of the stem conv")
    widths: list[int] = Field(min_length=1, max_length=8, description="channels of each stage")
    blocks: int = Field(1, ge=1, le=16, description="basic blocks per stage")
    shortcut_bn: bool = Field(True, description="BatchNorm after a 1x1 shortcut conv (MLPerf Tiny's ResNet-8 has none)")

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        return _check_widths(v)


class MlpArchitecture(_FamilyBase):
    """Flatten, then Linear(+BatchNorm1d)+ReLU layers of ``widths``, then a linear head:
    kiln/nets/mlp.py."""

    implementation: ClassVar[str] = "kiln.nets.mlp"

    family: Literal["mlp"]
    widths: list[int] = Field(max_length=16, description="hidden layer widths ([]: a linear classifier)")
    batch_norm: bool = False
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after each hidden layer (training only)")

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        return _check_widths(v)


class Conv1dArchitecture(_FamilyBase):
    """Over a (C, 1, L) sequence: per block a (1, k) conv-BN-ReLU and an optional (1, 2)
    max-pool, then global average pool and linear: kiln/nets/conv1d.py."""

    implementation: ClassVar[str] = "kiln.nets.conv1d"

    family: Literal["conv1d"]
    widths: list[int] = Field(min_length=1, max_length=12, description="channels of each block")
    kernel: int = Field(3, ge=1, le=64, description="kernel length along the sequence")
    pool: bool = Field(True, description="(1, 2) max-pool after each block")

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        return _check_widths(v)


class RnnArchitecture(_FamilyBase):
    """One recurrent cell (LSTM or GRU, one direction) unrolled over the L steps of a (C, 1, L)
    input, then a linear head on the last hidden state: kiln/nets/rnn.py. Unrolled into Linear,
    sigmoid, tanh and elementwise ops because TVM's ONNX frontend has no LSTM or GRU."""

    implementation: ClassVar[str] = "kiln.nets.rnn"
    _NO_STRUCTURED: ClassVar[str] = (
        "its gate layers' hidden units cannot be removed: the cell slices the gates at constant bounds "
        "(g[:, 0:H], ...) that a narrower layer would not follow, and nothing else in it is prunable; "
        "use prune method magnitude (and weight_coding to store the zeros sparsely)")
    refuses: ClassVar[dict[str, str]] = {"prune.structured": _NO_STRUCTURED, "prune.l1_structured": _NO_STRUCTURED}

    family: Literal["rnn"]
    cell: Literal["lstm", "gru"] = "lstm"
    hidden: int = Field(ge=1, le=1024, description="hidden state size")


class AutoencoderArchitecture(_FamilyBase):
    """Dense autoencoder: Flatten, Linear-BN1d-ReLU blocks of ``widths``, the bottleneck, the
    mirrored decoder, and a Linear back to the input size: kiln/nets/autoencoder.py. Trained to
    reconstruct its input (MSE); the reconstruction error is its anomaly score."""

    implementation: ClassVar[str] = "kiln.nets.autoencoder"
    objective: ClassVar[str] = "reconstruction"

    family: Literal["autoencoder"]
    widths: list[int] = Field([128, 128, 128, 128], max_length=16, description="encoder widths (the decoder mirrors them)")
    bottleneck: int = Field(8, ge=1, le=1024)

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        return _check_widths(v)


class _PresetBase(_FamilyBase):
    """An MLPerf Tiny reference model, built with the base family modules: kiln/nets/presets.py."""

    implementation: ClassVar[str] = "kiln.nets.presets"


class MlperfKwsArchitecture(_PresetBase):
    """MLPerf Tiny keyword spotting: DS-CNN over 49x10x1 MFCC features, 12 classes."""

    family: Literal["mlperf_kws"]


class MlperfVwwArchitecture(_PresetBase):
    """MLPerf Tiny visual wake words: MobileNetV1 alpha 0.25 over 96x96x3, 2 classes."""

    family: Literal["mlperf_vww"]


class MlperfIcArchitecture(_PresetBase):
    """MLPerf Tiny image classification: ResNet-8 over 32x32x3 (CIFAR-10), 10 classes."""

    family: Literal["mlperf_ic"]


class MlperfAdArchitecture(_PresetBase):
    """MLPerf Tiny anomaly detection: the dense autoencoder over 640 values (1, 1, 640)."""

    objective: ClassVar[str] = "reconstruction"

    family: Literal["mlperf_ad"]


class ModuleArchitecture(_ArchitectureBase):
    """The team's own torch module: ``class_name`` in ``file`` (kiln/nets/module.py has the
    constructor contract: ``cls(in_channels=, num_classes=, input_size=(H, W), **kwargs)``)."""

    implementation: ClassVar[str] = "kiln.nets.module"
    analytic: ClassVar[bool] = False

    family: Literal["module"]
    file: str = Field("model.py", description="Python file relative to the project's directory (projects/<app>/); "
                      "made absolute when the manifest loads")
    class_name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="the nn.Module subclass in that file")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of its constructor")
    objective: Literal["classification", "reconstruction"] = Field(
        "classification", description="classification: (N, classes) logits, cross-entropy; reconstruction: "
        "(N, C*H*W) output, MSE against the flattened input")


class OnnxArchitecture(_FamilyBase):
    """A model the team already has, as an ONNX file: not trained, post-training compression
    only (kiln/nets/onnx.py)."""

    implementation: ClassVar[str] = "kiln.nets.onnx"
    trains: ClassVar[bool] = False
    analytic: ClassVar[bool] = False

    family: Literal["onnx"]
    path: str = Field(description="the .onnx file, relative to the project's directory; made absolute when the manifest loads")


Architecture = Annotated[Union[CnnArchitecture, DsCnnArchitecture, MobilenetV1Architecture, ResnetArchitecture,
                               MlpArchitecture, Conv1dArchitecture, RnnArchitecture, AutoencoderArchitecture,
                               MlperfKwsArchitecture, MlperfVwwArchitecture, MlperfIcArchitecture,
                               MlperfAdArchitecture, ModuleArchitecture, OnnxArchitecture],
                         Field(discriminator="family")]
_ARCHITECTURE: TypeAdapter = TypeAdapter(Architecture)


def parse_architecture(data: dict[str, Any]):
    """An architecture dict (as a checkpoint stores it) as its family's model."""
    return _ARCHITECTURE.validate_python(data)


class Training(Strict):
    epochs: int = Field(ge=1, le=1000)
    batch: int = Field(128, ge=1, le=8192)
    lr: float = Field(gt=0, le=10)
    seed: int = 0
    threads: int = Field(2, ge=1, le=256)


# --- compression passes: settings per pass (a manifest's compression.passes.<i>.<pass>) -------


class PruneSettings(Strict):
    """passes/prune.py: magnitude (unstructured) or L1-norm channel (structured, torch-pruning) pruning."""

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

class _Step(Strict):
    """One entry of compression.passes: ``- <pass name>: {settings}``."""

    @property
    def name(self) -> str:
        return next(iter(type(self).model_fields))

    @property
    def settings(self):
        return getattr(self, self.name)


class PruneStep(_Step):
    prune: PruneSettings


class WeightCodingStep(_Step):
    weight_coding: WeightCodingSettings


class QuantizeStep(_Step):
    quantize: QuantizeSettings


# the registry of compression passes: one step model per pass, tagged by the pass's name
_STEPS: tuple[type[_Step], ...] = (PruneStep, WeightCodingStep, QuantizeStep)
PASS_SETTINGS: dict[str, type[Strict]] = {
    name: f.annotation for m in _STEPS for name, f in m.model_fields.items()}


def _step_name(v: Any) -> str | None:
    if isinstance(v, _Step):
        return v.name
    if isinstance(v, dict) and len(v) == 1:
        return str(next(iter(v)))
    return None


CompressionStep = Annotated[
    Union[tuple(Annotated[m, Tag(next(iter(m.model_fields)))] for m in _STEPS)],
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


def dataset_class_names(ds) -> list[str] | None:
    """The class names of a dataset, in label order: the format's own (listed or inferred;
    None while not inferred yet), or, for formats whose classes have no names (gtsrb, digits,
    synthetic), their indices as strings: '0', '1', ..."""
    if hasattr(type(ds), "class_names"):
        return ds.class_names
    return [str(i) for i in range(ds.num_classes)]


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
        else the family's class variable)."""
        return getattr(self.architecture, "objective", "classification")

    def normal_indices(self) -> list[int]:
        """The labels of the normal classes of an anomaly-detection app (ValueError naming the
        field when a name is unknown or the classes are not known yet)."""
        if self.anomaly is None:
            raise ValueError("anomaly.normal: not set (the app is not an anomaly detector)")
        names = dataset_class_names(self.dataset)
        if names is None:
            raise ValueError("anomaly.normal: the dataset's classes are not known yet (kiln.config infers them)")
        return self.anomaly.indices(names)

    @model_validator(mode="after")
    def _objective_fits(self) -> Project:
        """Anomaly detection and classification each get only their own settings, refused when
        the manifest loads: a reconstruction objective needs ``anomaly.normal`` and is judged by
        ``requirements.auc``; a classifier by ``requirements.accuracy``. The normal class names
        are checked against the data's classes here when they are known (listed, or a format
        whose classes are indices); inferred ones once kiln.config has inferred them
        (``normal_indices``)."""
        family, req = self.architecture.family, self.requirements
        if self.objective == "reconstruction":
            if self.anomaly is None:
                raise ValueError(f"anomaly.normal: family '{family}' has a reconstruction objective (anomaly "
                                 "detection): list the normal classes it is trained on, e.g. anomaly: {normal: [...]}; "
                                 "every other class is an anomaly")
            if req.accuracy is not None:
                raise ValueError(f"requirements.accuracy: family '{family}' has a reconstruction objective: its "
                                 "outputs are no classes to be right about; require auc: {min: ...} (the ROC AUC of "
                                 "the anomaly score) instead")
            if dataset_class_names(self.dataset) is not None:
                self.normal_indices()
        else:
            if req.auc is not None:
                raise ValueError(f"requirements.auc: family '{family}' is a classifier; auc applies to anomaly "
                                 "detection (a reconstruction objective, e.g. family autoencoder); require accuracy")
            if self.anomaly is not None:
                raise ValueError(f"anomaly: family '{family}' is a classifier; anomaly applies to a reconstruction "
                                 "objective only (e.g. family autoencoder)")
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


# --- board types ------------------------------------------------------------------------------


class Emulation(Strict):
    """How this machine stands in for the board: its programs run under qemu-user."""

    kind: Literal["qemu-user"]
    binary: str = Field(description="qemu-user binary, e.g. qemu-aarch64 or qemu-x86_64")
    sysroot: str = Field("/", description="the board's root for its libc/libstdc++ (qemu -L)")
    cpu: str | None = Field(None, description="qemu -cpu model, e.g. cortex-a53 or Haswell")
    max_samples: int | None = Field(
        None, ge=1, description="emulated instances validate on at most this many test samples "
        "(the first ones), for emulators too slow for a whole test set"
    )


class Compute(Strict):
    """What one core of the board sustains, with every core running (the runner uses --threads
    <cores>), on the tuned kernel libraries Kiln builds for it: a figure for the estimates made
    before any build (kiln/sizing.py), not a datasheet peak. Each board file says where its
    figures come from."""

    fp32_macs_per_s: float = Field(gt=0, description="float32 multiply-accumulates per second per core")
    int8_macs_per_s: float | None = Field(
        None, gt=0, description="int8 x int8 -> int32 multiply-accumulates per second per core (a manifest whose "
        "compression quantizes in mode int8); unset: the fp32 figure"
    )
    untuned_macs_per_s: float | None = Field(
        None, gt=0, description="multiply-accumulates per second of an untuned kernel library (TVM's default "
        "pipeline, which runs on one core); unset: fp32_macs_per_s / 20, the ratio measured on x86-host"
    )


class Board(Strict):
    """A board *type*: what Kiln compiles for and how its runtime runs."""

    name: str
    description: str = ""
    arch: Literal["x86_64", "aarch64"]
    tvm_target: dict[str, Any] = Field(description="TVM target as a JSON dict")
    cc: str = Field(description="compiler used to link the kernel library")
    runtime: Literal["tvm-cpp", "compile-only"] = Field(
        "tvm-cpp",
        description="tvm-cpp: validated with the C++ runner; compile-only: its kernel library is "
        "built but it cannot run in this lab, so it is reported as not validated, never as passed",
    )
    cores: int = Field(1, ge=1, le=256)
    memory_mb: int = Field(gt=0, description="RAM of the board, MiB: an app whose estimated peak memory exceeds it is refused")
    compute: Compute | None = Field(
        None, description="sustained MACs per second per core, for the latency estimate made when a manifest "
        "loads (kiln/sizing.py); unset: latency is not estimated on this board"
    )
    runtime_overhead_kb: int = Field(
        8400, ge=0, description="resident memory of the runner and TVM runtime with a negligible model, KiB "
        "(the default is the one measured on x86-host; see targets/x86-host.yaml)"
    )
    emulation: Emulation | None = None
    tune_trials: int = Field(
        0, ge=0, description="default MetaSchedule trial budget per model for this board type "
        "(a manifest's tuning.trials overrides it); 0 compiles untuned"
    )

    @field_validator("tvm_target")
    @classmethod
    def _target(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "kind" not in v:
            raise ValueError("needs a 'kind' key, e.g. {kind: llvm, mtriple: ...}")
        return v


def _unique_names(boards: list) -> None:
    names = [b.name for b in boards]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"board instance names must be unique, repeated: {sorted(dup)}")


# --- lab inventory: transports (by kind) and lab backends (by backend) ------------------------
# A transport's connection fields may be left out only where the lab's backend provides them
# (the emulated lab starts the board and fills them in); a static inventory must give them.


class LocalTransport(Strict):
    """The board is this machine: commands are subprocesses, files are copies."""

    implementation: ClassVar[str] = "hil.transport.local"
    provided: ClassVar[tuple[str, ...]] = ()

    kind: Literal["local"] = "local"


class SSHTransport(Strict):
    """A Linux board on a network, reached with OpenSSH (fabric/paramiko)."""

    implementation: ClassVar[str] = "hil.transport.ssh"
    provided: ClassVar[tuple[str, ...]] = ("host", "user", "key", "known_hosts")

    kind: Literal["ssh"]
    host: str | None = Field(None, description="address of the board (required unless the lab backend provides it)")
    port: int = Field(22, ge=1, le=65535)
    user: str | None = Field(None, description="login on the board (required unless the lab backend provides it)")
    key: str | None = Field(None, description="private key file; relative paths are relative to the inventory file")
    known_hosts: str | None = Field(None, description="known_hosts file the lab provides; the board's host key must be in it")
    accept_unknown_host_key: bool = Field(
        False, description="trust a host key not in known_hosts (first contact only); off by default"
    )
    workdir: str = Field("kiln", description="work directory on the board (relative to the login's home)")
    connect_timeout_s: float = Field(10, gt=0)
    retries: int = Field(3, ge=0, le=20, description="retries of a failed step where a retry is safe")


class SerialTransport(Strict):
    """A board reached only through a serial console (a UART, or a pty in the emulated lab)."""

    implementation: ClassVar[str] = "hil.transport.serial"
    provided: ClassVar[tuple[str, ...]] = ("port",)

    kind: Literal["serial"]
    port: str | None = Field(None, description="serial device, e.g. /dev/ttyUSB0 (required unless the lab backend provides it)")
    baud: int = Field(115200, gt=0)
    workdir: str = Field("/tmp/kiln", description="work directory on the board")
    chunk_bytes: int = Field(4096, ge=64, le=65536, description="payload bytes per upload frame")
    retries: int = Field(5, ge=0, le=50, description="retransmissions of one frame before giving up")
    timeout_s: float = Field(10, gt=0, description="how long to wait for the board to answer one frame or prompt")


Transport = Annotated[Union[LocalTransport, SSHTransport, SerialTransport], Field(discriminator="kind")]


class Instance(Strict):
    """A board *instance* in a lab: a type, a transport and tags; one model whatever started
    the board (a static inventory, the emulated lab, ...)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    type: str = Field(description="a board type from targets/*.yaml")
    transport: Transport = Field(default_factory=LocalTransport)
    emulated: bool = Field(
        False, description="runs on this machine under its type's emulation (e.g. qemu-user); "
        "its latency is reported, not enforced"
    )
    tags: list[str] = Field(default_factory=list)

    @property
    def link(self) -> str:
        return self.transport.kind


class _LabBase(Strict):
    implementation: ClassVar[str]
    provides_transports: ClassVar[bool] = False

    name: str = "lab"
    boards: list[Instance] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        _unique_names(self.boards)
        if not self.provides_transports:
            for i, b in enumerate(self.boards):
                missing = [f for f in type(b.transport).provided if getattr(b.transport, f) is None]
                if missing:
                    raise ValueError(f"boards.{i}.transport ({b.name}, {b.transport.kind}): missing "
                                     f"{', '.join(missing)} (only a lab backend that starts its boards provides them)")
        return self


class StaticLab(_LabBase):
    """A lab of boards that are already there: every transport is given in full (hil/lab/static.py)."""

    implementation: ClassVar[str] = "hil.lab.static"

    backend: Literal["static"] = "static"


class EmulatedLab(_LabBase):
    """The default lab (hil/emulator/lab.yaml): Kiln starts each board on this machine (a real
    sshd per SSH board, a real pty per serial board) and fills in its transport; once up it is
    a static inventory (build/lab/inventory.yaml). Provider: hil/emulator/lab.py."""

    implementation: ClassVar[str] = "hil.emulator.lab"
    provides_transports: ClassVar[bool] = True

    backend: Literal["emulated"]
    name: str = "emulated"


class LabgridSSH(Strict):
    """How Kiln logs in to the SSH boards of a labgrid lab: a place's ``NetworkService`` gives the
    address, port and user; the key and known_hosts are the runner's own."""

    user: str | None = Field(None, description="login, when the NetworkService names none")
    key: str | None = Field(None, description="private key file; relative paths are relative to the lab file")
    known_hosts: str | None = Field(None, description="known_hosts with every board's host key")
    accept_unknown_host_key: bool = False
    connect_timeout_s: float = Field(5, gt=0)
    retries: int = Field(2, ge=0, le=20)


class EmulatedHosts(Strict):
    """A multi-host labgrid lab on this machine (hil/emulator/multihost.py): a coordinator,
    exporter "hosts" and runner namespaces, each in its own network namespace."""

    exporters: dict[str, list[str]] = Field(min_length=1, description="exporter host -> the boards it exports")
    runners: list[str] = Field(default_factory=lambda: ["run1", "run2"], description="runner namespaces")

    @field_validator("exporters", "runners")
    @classmethod
    def _names(cls, v):
        for n in (v if isinstance(v, list) else list(v)):
            if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", n):
                raise ValueError(f"'{n}': a host name here is 1-8 lowercase letters and digits, starting with a letter")
        return v


class LabgridLab(Strict):
    """A lab on many hosts, driven through a labgrid coordinator (hil/lab/labgrid.py): each
    board is a place tagged ``kiln_type=<board type>``; Kiln acquires places through labgrid's
    client API, renews a lease on each, and reaches the boards over its own SSH and serial
    (RFC2217) transports. ``boards`` may be left out: the places are then found on the
    coordinator by their tags."""

    implementation: ClassVar[str] = "hil.lab.labgrid"
    emulated_by: ClassVar[str] = "hil.emulator.multihost"  # with ``emulate``: starts the lab, then hil.lab.labgrid
    provides_transports: ClassVar[bool] = True

    backend: Literal["labgrid"]
    name: str = "labgrid"
    coordinator: str = Field(pattern=r"^[A-Za-z0-9_.:\[\]-]+:[0-9]{1,5}$", description="HOST:PORT of labgrid-coordinator")
    boards: list[Instance] = Field(default_factory=list, description="the places Kiln expects (optional)")
    ssh: LabgridSSH = Field(default_factory=LabgridSSH)
    lease_ttl_s: float = Field(15, ge=1, le=600, description="a lease not renewed for this long lapses; the reaper frees its place")
    connect_timeout_s: float = Field(10, gt=0, description="how long to wait for the coordinator")
    emulate: EmulatedHosts | None = Field(None, description="start this lab on this machine (hil/emulator/multihost.py)")

    @model_validator(mode="after")
    def _check(self):
        _unique_names(self.boards)
        if self.emulate:
            listed = [b for names in self.emulate.exporters.values() for b in names]
            names = [b.name for b in self.boards]
            missing = sorted(set(names) - set(listed))
            unknown = sorted(set(listed) - set(names))
            if missing or unknown or len(listed) != len(set(listed)):
                raise ValueError(f"emulate.exporters must list each board of 'boards' exactly once "
                                 f"(not exported: {missing or 'none'}; not a board: {unknown or 'none'})")
            local = [b.name for b in self.boards if b.link == "local"]
            if local:
                raise ValueError(f"boards {local}: a board on an exporter host is reached over ssh or serial, not local")
        return self


def _backend(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("backend", "static")
    return getattr(v, "backend", "static")


Lab = Annotated[Union[Annotated[StaticLab, Tag("static")], Annotated[EmulatedLab, Tag("emulated")],
                      Annotated[LabgridLab, Tag("labgrid")]],
                Discriminator(_backend, custom_error_type="lab_backend",
                              custom_error_message="unknown lab backend (expected 'static', 'emulated' or 'labgrid')")]
Inventory = StaticLab  # what every backend hands back once its boards are up
