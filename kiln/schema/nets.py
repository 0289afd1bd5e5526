"""Net families (``Architecture``, by ``family``): each settings model names its module in
kiln/nets/<family>.py (torch-free ``estimate``, torch ``build``)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, TypeAdapter, ValidationInfo, field_validator

from kiln.schema.base import Strict


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


class FomoArchitecture(_FamilyBase):
    """FOMO-style detector: MobileNetV1's stem and its first ``blocks`` depthwise-separable blocks
    (widths scaled by ``alpha``), cut where the grid is 1/8 of the input, then a 1x1 conv-ReLU of
    ``head_width`` channels and a 1x1 conv of classes + 1 channels (background first): a
    per-class heat map on the H/8 x W/8 grid, fully convolutional: kiln/nets/fomo.py. Its
    objective is detection (kiln/schema/tasks.py Detection)."""

    implementation: ClassVar[str] = "kiln.nets.fomo"
    objective: ClassVar[str] = "detection"

    family: Literal["fomo"]
    alpha: float = Field(0.25, gt=0, le=4, description="width multiplier of the MobileNetV1 blocks")
    blocks: int = Field(5, ge=4, le=5, description="MobileNetV1 blocks kept: 4 reaches the 1/8 grid (its "
                        "stride-2 256-alpha block), 5 adds the next block at 1/8 (as FOMO keeps MobileNetV2 to 1/8)")
    head_width: int = Field(32, ge=0, le=1024, description="channels of the 1x1 conv-ReLU before the output conv "
                            "(0: none)")


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


class TfliteArchitecture(_FamilyBase):
    """A model the team already has, as a TensorFlow Lite file (float32, or int8 with full
    integer quantization): not trained, post-training compression only (kiln/nets/tflite.py).
    An int8 file is taken as quantized: its manifest lists ``quantize`` (mode int8) as its only
    pass, which keeps the file's scales and zero points instead of calibrating."""

    implementation: ClassVar[str] = "kiln.nets.tflite"
    trains: ClassVar[bool] = False
    analytic: ClassVar[bool] = False

    family: Literal["tflite"]
    path: str = Field(description="the .tflite file, relative to the project's directory; made absolute when the "
                      "manifest loads")


Architecture = Annotated[Union[CnnArchitecture, DsCnnArchitecture, MobilenetV1Architecture, FomoArchitecture, ResnetArchitecture,
                               MlpArchitecture, Conv1dArchitecture, RnnArchitecture, AutoencoderArchitecture,
                               MlperfKwsArchitecture, MlperfVwwArchitecture, MlperfIcArchitecture,
                               MlperfAdArchitecture, ModuleArchitecture, OnnxArchitecture, TfliteArchitecture],
                         Field(discriminator="family")]
_ARCHITECTURE: TypeAdapter = TypeAdapter(Architecture)


def parse_architecture(data: dict[str, Any]):
    """An architecture dict (as a checkpoint stores it) as its family's model."""
    return _ARCHITECTURE.validate_python(data)
