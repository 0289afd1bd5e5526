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


def _range(lo: float, hi: float, what: str):
    """A validator for a (low, high) pair within [lo, hi], low <= high."""
    def check(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (lo <= v[0] <= v[1] <= hi):
            raise ValueError(f"({v[0]}, {v[1]}): give (low, high) {what}, low <= high, within [{lo}, {hi}]")
        return v
    return classmethod(check)


class _AugmentBase(Strict):
    """Online augmentation of the training samples (passes/support/training.py): seeded by
    training.seed, drawn anew each epoch, never applied to val or test, and outside what the
    board computes. The defaults are off."""

    def on(self) -> bool:
        """Whether any augmentation is set (all defaults: training is exactly as without)."""
        return self != type(self)()


class ImageAugment(_AugmentBase):
    """Images (pixels in [0, 1]): small rotations, brightness, contrast, blur."""

    rotate_deg: float = Field(0.0, ge=0, le=45, description="rotation by up to +-this many degrees (border pixels repeat)")
    brightness: float = Field(0.0, ge=0, le=1, description="pixels scaled by 1 +- up to this")
    contrast: float = Field(0.0, ge=0, le=1, description="each image's deviation from its mean scaled by 1 +- up to this")
    blur: float = Field(0.0, ge=0, le=1, description="probability of a 3x3 blur")


Augment = ImageAugment  # the name kiln.schema has exported since images were the only modality


class NoiseMix(Strict):
    """Background noise mixed into training clips (Speech Commands' ``_background_noise_``)."""

    folder: str | None = Field(None, description="a folder of 16-bit mono WAV files at dataset.sample_rate; "
                               "relative paths are relative to the repo; unset: _background_noise_ in the data set's root")
    prob: float = Field(0.8, ge=0, le=1, description="probability that a clip gets noise")
    snr_db: tuple[float, float] = Field((5.0, 20.0), description="(low, high) signal-to-noise ratio in dB, drawn "
                                        "uniformly per clip (a noise segment at a random place in a random file)")
    _snr = field_validator("snr_db")(_range(-30, 60, "in dB"))


class AudioAugment(_AugmentBase):
    """Audio clips (int16 samples, before the front end): time shift, background noise, gain."""

    time_shift_ms: float = Field(0.0, ge=0, le=1000, description="shift each clip by up to +-this many ms, zero-filled")
    noise: NoiseMix | None = Field(None, description="mix in background noise; unset: none")
    gain_db: tuple[float, float] = Field((0.0, 0.0), description="(low, high) gain in dB drawn uniformly per clip "
                                         "(after the noise; the result is clipped to int16)")
    _gain = field_validator("gain_db")(_range(-40, 40, "in dB"))


class SensorAugment(_AugmentBase):
    """Sensor windows (raw values, before the front end): jitter, scaling, time warps."""

    jitter: float = Field(0.0, ge=0, le=1, description="std of Gaussian noise added to every value, relative to "
                          "its channel's std over the training split")
    scale: tuple[float, float] = Field((1.0, 1.0), description="(low, high) range of a random factor per window "
                                       "and channel")
    time_warp: float = Field(0.0, ge=0, le=0.2, description="a smooth random resampling of each window's time "
                             "axis: the local speed varies by up to +-this fraction")
    _scale = field_validator("scale")(_range(0.01, 10, "factors"))


class TableAugment(_AugmentBase):
    """Tables: no augmentation (a row's features have no neighbourhood to perturb along)."""


# the augmentation model of each raw layout (_DatasetBase.layout)
AUGMENTS: dict[str, type[_AugmentBase]] = {"image": ImageAugment, "audio": AudioAugment, "sequence": SensorAugment,
                                           "table": TableAugment}


def augment_of_layout(layout: str, v):
    """``dataset.augment`` validated by its layout's model; a setting of another modality is
    refused by name (``time_shift_ms`` on images, ``rotate_deg`` on sensor windows)."""
    model = AUGMENTS[layout]
    if isinstance(v, model):
        return v
    if isinstance(v, _AugmentBase):
        v = v.model_dump(exclude_defaults=True)
    if v is None:
        v = {}
    if not isinstance(v, dict):
        raise ValueError(f"a mapping of augmentation settings, got {type(v).__name__}")
    for key in v:
        if key not in model.model_fields:
            other = [k for k, m in AUGMENTS.items() if key in m.model_fields]
            what = f"an augmentation of {other[0]} samples" if other else "not an augmentation"
            raise ValueError(f"{key}: {what}; this format's samples are {layout} samples (their augmentations: "
                             f"{', '.join(model.model_fields) or 'none'})")
    try:
        return model.model_validate(v)
    except ValueError as e:  # pydantic's ValidationError: said as field: message
        errors = getattr(e, "errors", None)
        if errors is None:
            raise
        raise ValueError("; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg'].removeprefix('Value error, ')}"
                                   for err in errors())) from e


def raw_augmented(ds) -> bool:
    """Whether training augments RAW samples before the front end (an augmentation is on and the
    format has a front end): the data stage then keeps the raw training split (raw_train.npz)."""
    return ds.augment.on() and getattr(ds, "front_end", None) is not None


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
    augment: Union[ImageAugment, AudioAugment, SensorAugment, TableAugment] = Field(
        default_factory=dict, validate_default=True, description="online augmentation of the training samples, "
        "by the format's layout: images rotate_deg/brightness/contrast/blur, audio time_shift_ms/noise/gain_db, "
        "sensor windows jitter/scale/time_warp, tables none")
    workers: int | None = Field(None, ge=1, le=1024, description="processes that decode the data set's files in the "
                                "data stage (formats that read a file per sample); unset: every core")

    @field_validator("augment", mode="before")
    @classmethod
    def _augment(cls, v):
        return augment_of_layout(cls.layout, v)


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
    # set when the manifest loads (kiln.schema.tasks.Regression.check) for a regressor: the label
    # is a number, read by the formats that can (``numeric_label``), and the net has one output
    _numeric: bool = PrivateAttr(False)
    numeric_label: ClassVar[str | None] = None  # where a format reads a numeric label (None: it cannot)

    _classes = field_validator("classes")(classmethod(lambda cls, v: _class_names(v)))

    @property
    def class_names(self) -> list[str] | None:
        return self.classes or self._inferred.get("classes")

    @property
    def num_classes(self) -> int:
        if self._numeric:  # a regressor: one output, the value
            return 1
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
    numeric_label: ClassVar[str | None] = "<path>/labels.csv: a header file,value, a row per image"
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


class _AudioDataset(_FrontEndShaped, _DatasetBase):
    """What the audio formats share: 16-bit PCM mono clips at ``sample_rate``, padded or cut to
    ``clip_seconds``; the board is fed the raw int16 samples and the front end (MFCC by default)
    runs in the library."""

    layout: ClassVar[str] = "audio"
    sample_rate: int = Field(16000, ge=1000, le=192_000, description="Hz; a clip at another rate is reported")
    clip_seconds: float = Field(1.0, gt=0, le=60, description="shorter clips are zero-padded, longer cut")
    front_end: Annotated[Union[MfccFrontEnd, LogmelFrontEnd], Field(discriminator="kind")] = Field(
        default_factory=lambda: MfccFrontEnd(kind="mfcc"))

    @model_validator(mode="after")
    def _fits(self):
        try:
            self.front_end.frames(self.raw_shape()[0], self.sample_rate)
        except ValueError as e:
            raise ValueError(f"front_end: {e}") from e
        return self

    def raw_shape(self) -> tuple[int, ...]:
        return (max(1, round(self.sample_rate * self.clip_seconds)),)


class AudioFoldersDataset(_AudioDataset):
    """``<root>/<class>/*.wav`` (or with train/ val/ test/ above the classes), 16-bit PCM mono
    at ``sample_rate``; clips padded or cut to ``clip_seconds``: passes/formats/audio_folders.py."""

    implementation: ClassVar[str] = "passes.formats.audio_folders"
    format: Literal["audio_folders"]
    synthetic: FolderSynthetic | None = Field(default_factory=FolderSynthetic,
                                              description="keyword-like clips generated under build/ when path holds none")


MLPERF_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


class SpeechCommandsSynthetic(Strict):
    """A synthetic tree in Speech Commands' own layout (passes/formats/speech_commands.py)."""

    speakers: int = Field(20, ge=3, le=2000, description="speakers (8-hex names); every tenth from the second in "
                          "testing_list.txt, the next in validation_list.txt")
    clips: int = Field(2, ge=1, le=20, description="takes of each word per speaker")
    other_words: int = Field(4, ge=1, le=10, description="words beside dataset.words: the _unknown_ pool")
    seed: int = 0


class SpeechCommandsDataset(_AudioDataset):
    """The Speech Commands v2 tree as it ships (``<word>/<speaker>_nohash_<n>.wav``,
    ``_background_noise_/``, ``validation_list.txt``, ``testing_list.txt``), read in place, set up
    as MLPerf Tiny's keyword spotting: classes ``_silence_``, ``_unknown_`` and ``words``:
    passes/formats/speech_commands.py."""

    implementation: ClassVar[str] = "passes.formats.speech_commands"
    format: Literal["speech_commands"]
    words: list[str] = Field(default_factory=lambda: list(MLPERF_WORDS), min_length=1,
                             description="the keywords (word folders), in output order after _silence_ and _unknown_; "
                             "default MLPerf Tiny's ten")
    silence_percentage: float = Field(10.0, ge=0, le=100, description="_silence_ clips (one-second slices of "
                                      "_background_noise_) per split, in % of its word clips")
    unknown_percentage: float = Field(10.0, ge=0, le=100, description="_unknown_ clips (drawn from the other words) "
                                      "per split, in % of its word clips")
    synthetic: SpeechCommandsSynthetic | None = Field(None, description="a tree in the same layout generated under "
                                                      "build/ when path holds none")

    @field_validator("words")
    @classmethod
    def _words(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"a word is listed twice: {sorted(w for w in set(v) if v.count(w) > 1)[0]!r}")
        bad = [w for w in v if not w or w.startswith(("_", ".")) or "/" in w]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a word folder (names starting with _ are the data set's own)")
        return v

    @model_validator(mode="after")
    def _no_classes(self):
        if self.classes is not None:
            raise ValueError("classes: speech_commands' classes are _silence_, _unknown_ and dataset.words; list "
                             "the keywords in words")
        return self

    @property
    def class_names(self) -> list[str]:
        return ["_silence_", "_unknown_", *self.words]


class CsvWindowsDataset(_FrontEndShaped, _DatasetBase):
    """Time-series CSV files (a timestamp column, named channel columns, a label column; or,
    with ``label: null``, one folder or file per class) cut into windows of ``window`` samples
    every ``stride``: passes/formats/csv_windows.py. The board is fed the raw values."""

    implementation: ClassVar[str] = "passes.formats.csv_windows"
    layout: ClassVar[str] = "sequence"
    numeric_label: ClassVar[str | None] = "the label column (dataset.label) as numbers: a window's target is its last row's"
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
    numeric_label: ClassVar[str | None] = "the label column (dataset.label) as numbers"
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



# --- object detection: scenes with boxes ---------------------------------------------------------


class DetectionSynthetic(Strict):
    """Synthetic scenes in the format's own layout (passes/formats/support/detection_synth.py):
    traffic signs (GTSRB's drawings) pasted into cluttered scenes at several sizes, several per
    scene, some scenes with none. Deterministic by ``seed``."""

    scenes: int = Field(120, ge=1, le=100_000, description="scenes in the training folder (val and test are split "
                        "off them, whole scenes)")
    scene_size: tuple[int, int] = Field((240, 320), description="(height, width) of a scene in pixels")
    sign_px: tuple[int, int] = Field((20, 56), description="(low, high) side of a sign in pixels")
    max_per_scene: int = Field(3, ge=0, le=64, description="signs per scene: 0 to this many")
    empty: float = Field(0.15, ge=0, le=1, description="fraction of scenes with no sign")
    classes: int = Field(4, ge=1, le=43, description="how many sign classes are drawn when dataset.classes is "
                         "not listed (a fixed order of distinct GTSRB signs: stop, no entry, yield, priority, ...)")
    seed: int = 0
    _sizes = field_validator("sign_px")(_range(4, 1024, "in pixels"))

    @field_validator("scene_size")
    @classmethod
    def _scene(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not all(16 <= s <= 4096 for s in v):
            raise ValueError("each side must be between 16 and 4096 pixels")
        return v

    @model_validator(mode="after")
    def _fits(self):
        if self.sign_px[1] > min(self.scene_size):
            raise ValueError(f"sign_px: signs up to {self.sign_px[1]} px do not fit a {self.scene_size[0]}x"
                             f"{self.scene_size[1]} scene")
        return self


def _detection_names(v: list[str] | None) -> list[str] | None:
    if v is None:
        return v
    if not v:
        raise ValueError("list at least one class")
    if len(set(v)) != len(v):
        raise ValueError(f"a class is listed twice: {sorted(c for c in set(v) if v.count(c) > 1)[0]!r}")
    return v


class _DetectionDataset(_ImageDataset):
    """What the detection formats share: RGB scenes resized to ``image_size`` with their objects'
    boxes, normalized to the image (so resizing moves no box). Loaded as uint8 (N, H, W, 3)
    scenes and float32 (N, max_objects, 5) rows [class, cx, cy, w, h], padding rows all -1."""

    labels: ClassVar[str] = "boxes"  # the task side tells a detection data set by this
    channels: ClassVar[int] = 3
    numeric_label: ClassVar[str | None] = None

    path: str = Field(description="the data set's root; relative paths are relative to the repo")
    image_size: tuple[int, int] = Field((96, 96), description="(height, width) of the model's input; scenes are "
                                        "resized to it (boxes are normalized, so they follow)")
    max_objects: int = Field(16, ge=1, le=1000, description="the most objects one scene may hold (the label array's "
                             "rows per scene); a scene with more is refused, naming it")
    synthetic: DetectionSynthetic | None = Field(
        default_factory=DetectionSynthetic, description="scenes generated under build/ in this format's layout when "
        "path holds no data; only when written in the manifest (opt-in)")
    # set by kiln/config.py when the manifest loads and the classes are read from the data
    _inferred: dict = PrivateAttr(default_factory=dict)
    _numeric: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _room(self):
        syn = self.synthetic
        if syn is not None and "synthetic" in self.model_fields_set and syn.max_per_scene > self.max_objects:
            raise ValueError(f"synthetic.max_per_scene: {syn.max_per_scene} signs a scene do not fit max_objects "
                             f"({self.max_objects})")
        return self

    @field_validator("augment", mode="after")
    @classmethod
    def _no_geometry(cls, v):
        if getattr(v, "rotate_deg", 0):
            raise ValueError("rotate_deg: a rotation would move the boxes, which augmentation does not follow; "
                             "a detection data set takes brightness, contrast and blur only")
        return v

    @property
    def class_names(self) -> list[str] | None:
        return self.classes or self._inferred.get("classes")

    @property
    def num_classes(self) -> int:
        names = self.class_names
        if names is None:
            raise ValueError("the classes are not known before the data is read (kiln.config infers them)")
        return len(names)


class _NamedDetection(_DetectionDataset):
    classes: list[str] | None = Field(None, description="class names in output order; unset: read from the data "
                                      "(the format's names list, categories or object names)")
    _classes = field_validator("classes")(classmethod(lambda cls, v: _detection_names(v)))


GTSDB_CLASSES = 43


class GtsdbDataset(_DetectionDataset):
    """The German Traffic Sign Detection Benchmark as it ships: ``*.ppm`` scenes and ``gt.txt``
    (``file;x1;y1;x2;y2;class``, inclusive pixel corners, GTSRB's 43 class ids; a scene not in
    gt.txt holds no sign): passes/formats/gtsdb.py."""

    implementation: ClassVar[str] = "passes.formats.gtsdb"
    format: Literal["gtsdb"]
    classes: list[int] | None = Field(None, description="the GTSRB class ids detected, in output order (e.g. [14, 17] "
                                      "for stop and no entry); other signs in gt.txt are left out (counted in the "
                                      "report); unset: all 43")

    @field_validator("classes")
    @classmethod
    def _ids(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        bad = [c for c in v if not 0 <= c < GTSDB_CLASSES]
        if bad:
            raise ValueError(f"{bad[0]} is not a GTSRB class id (0..{GTSDB_CLASSES - 1})")
        if not v or len(set(v)) != len(v):
            raise ValueError("list each class id once, at least one")
        return v

    @property
    def class_ids(self) -> list[int]:
        return list(self.classes) if self.classes else list(range(GTSDB_CLASSES))

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.class_ids]


class YoloDataset(_NamedDetection):
    """YOLO txt: ``images/`` + ``labels/`` (one ``.txt`` per image, lines ``class cx cy w h``
    normalized), either flat or with ``train/ val/ test/`` below both; class names from
    ``classes.txt`` or ``data.yaml``'s ``names`` (or dataset.classes): passes/formats/yolo.py."""

    implementation: ClassVar[str] = "passes.formats.yolo"
    format: Literal["yolo"]


class CocoDataset(_NamedDetection):
    """COCO instances JSON (``images``, ``annotations`` with ``bbox`` [x, y, w, h] in pixels,
    ``categories`` id -> name) and a folder of the images: passes/formats/coco.py."""

    implementation: ClassVar[str] = "passes.formats.coco"
    format: Literal["coco"]
    annotations: str | None = Field(None, description="the instances JSON, relative to path; unset: the one *.json "
                                    "in path or path/annotations/")
    images: str | None = Field(None, description="the images' folder, relative to path (file_name is relative to "
                               "it); unset: path/images, else the JSON's folder, else path")


class VocDataset(_NamedDetection):
    """Pascal VOC: ``JPEGImages/`` + ``Annotations/*.xml`` (``<object><name>``, ``<bndbox>``
    1-based inclusive pixel corners): passes/formats/voc.py."""

    implementation: ClassVar[str] = "passes.formats.voc"
    format: Literal["voc"]


Dataset = Annotated[Union[GtsrbDataset, DigitsDataset, SyntheticDataset, ImageFoldersDataset, AudioFoldersDataset,
                          SpeechCommandsDataset, CsvWindowsDataset, CsvTableDataset, GtsdbDataset, YoloDataset,
                          CocoDataset, VocDataset], Field(discriminator="format")]

def dataset_class_names(ds) -> list[str] | None:
    """The class names of a dataset, in label order: the format's own (listed or inferred;
    None while not inferred yet), or, for formats whose classes have no names (gtsrb, digits,
    synthetic), their indices as strings: '0', '1', ..."""
    if hasattr(type(ds), "class_names"):
        return ds.class_names
    return [str(i) for i in range(ds.num_classes)]
