"""Dataset formats (``Dataset``, by ``format``): where the samples are, their raw layout, the
split and the augmentation; the formats of a team's own data infer their classes when the
manifest loads (kiln/config.py). Implementations: passes/formats/<format>.py."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, PrivateAttr, field_validator, model_validator

from kiln.schema.base import Strict
from kiln.schema.frontends import LogmelFrontEnd, MfccFrontEnd, NormalizeFrontEnd


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

def dataset_class_names(ds) -> list[str] | None:
    """The class names of a dataset, in label order: the format's own (listed or inferred;
    None while not inferred yet), or, for formats whose classes have no names (gtsrb, digits,
    synthetic), their indices as strings: '0', '1', ..."""
    if hasattr(type(ds), "class_names"):
        return ds.class_names
    return [str(i) for i in range(ds.num_classes)]
