"""MLPerf Tiny's four reference models as presets (``family: mlperf_kws`` ...), built with the
base family modules. Their structure follows the reference model files of mlcommons/tiny
(benchmark/training/...; read, not copied):

* ``mlperf_kws`` (keyword_spotting/keras_model.py, ``ds_cnn``): Conv2D 64 (10, 4) stride 2
  'same'-BN-ReLU, four depthwise 3x3-BN-ReLU + pointwise 64-BN-ReLU blocks, average pool,
  Dense 12; over 49x10x1.
* ``mlperf_vww`` (visual_wake_words/vww_model.py): MobileNetV1 alpha 0.25 (8 ... 256
  channels, 13 blocks), average pool, Dense 2; over 96x96x3.
* ``mlperf_ic`` (image_classification/keras_model.py, ``resnet_v1_eembc`` with the 16 filters
  of the benchmark's ResNet-8): stem 16, stages 16/32/64 of one basic block, 1x1 shortcut
  convs without BatchNorm, average pool, Dense 10; over 32x32x3.
* ``mlperf_ad`` (anomaly_detection/keras_model.py): Dense 128 x4, 8, 128 x4 each with BN and
  ReLU, Dense back to 640; over (1, 1, 640).

Where the torch build differs from the Keras file, and why (none changes a parameter or MAC
count): Keras' 'same' padding puts an odd extra row at the end, torch pads symmetrically, so an
even kernel at stride 2 (kws' (10, 4)) is padded one row more at the start (the same output
shape; a separate Pad would export with dynamic pads, which TVM refuses); kws' AveragePooling2D
of (24, 5) over its 25x5 map is a global average pool here (Kiln's vocabulary has
AdaptiveAvgPool2d(1)); ReLU where vww's comment mentions ReLU6 (the file itself uses ReLU);
kws' dropouts (0.2 after the first conv, 0.4 before the pool) are kept.

:func:`reference_params` counts parameters the way Keras does (BatchNorm's per-channel
weights included, every conv and dense with its bias, as the reference files have them).
"""

from __future__ import annotations

from kiln.nets import Complexity, Plan
# imported by name (not through the registry) so a preset app's tasks list these files as
# their sources (kiln/sources.py follows import statements): editing ds_cnn.py reruns mlperf_kws
from kiln.nets import autoencoder, ds_cnn, mobilenet_v1, resnet
from kiln.schema import (AutoencoderArchitecture, DsCnnArchitecture, MobilenetV1Architecture, ResnetArchitecture,
                         parse_architecture)

# the reference's input (channels, height, width), classes, and the counts from the
# reference files (parameters with BatchNorm's gamma and beta, MACs of conv and dense layers)
REFERENCE = {
    "mlperf_kws": {"input": (1, 49, 10), "classes": 12, "params": 23_756, "macs": 2_660_000},
    "mlperf_vww": {"input": (3, 96, 96), "classes": 2, "params": 216_322, "macs": 7_490_000},
    "mlperf_ic": {"input": (3, 32, 32), "classes": 10, "params": 78_186, "macs": 12_500_000},
    "mlperf_ad": {"input": (1, 1, 640), "classes": 2, "params": 267_928, "macs": 260_000},
}


def base(arch):
    """The base family's architecture a preset is."""
    family = arch.family if not isinstance(arch, str) else arch
    if family == "mlperf_kws":
        return DsCnnArchitecture(family="ds_cnn", filters=64, kernel=(10, 4), stride=(2, 2), widths=[64] * 4,
                                 stem_dropout=0.2, dropout=0.4)
    if family == "mlperf_vww":
        return MobilenetV1Architecture(family="mobilenet_v1", alpha=0.25)
    if family == "mlperf_ic":
        return ResnetArchitecture(family="resnet", stem=16, widths=[16, 32, 64], blocks=1, shortcut_bn=False)
    if family == "mlperf_ad":
        return AutoencoderArchitecture(family="autoencoder", widths=[128] * 4, bottleneck=8)
    raise ValueError(f"unknown MLPerf Tiny preset {family!r} (expected one of {', '.join(REFERENCE)})")


def _module(arch):
    return {"ds_cnn": ds_cnn, "mobilenet_v1": mobilenet_v1, "resnet": resnet, "autoencoder": autoencoder}[base(arch).family]


def plan(arch, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    return _module(arch).plan(base(arch), image_size, in_ch, classes)


def estimate(arch, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    return plan(arch, image_size, in_ch, classes).complexity()


def build(arch, in_ch: int, classes: int, image_size: tuple[int, int]):
    return _module(arch).build(base(arch), in_ch, classes, image_size)


def reference_params(arch, image_size: tuple[int, int] | None = None, in_ch: int | None = None,
                     classes: int | None = None, bn_per_channel: int = 2) -> int:
    """Parameters counted as Keras counts them, for a preset or any family with a ``plan``.

    ``bn_per_channel`` 2 counts BatchNorm's trainable gamma and beta (Keras' "Trainable
    params"): the issue's figures, 23,756 / 216,322 / 78,186 / 267,928, are this count. 4 adds
    the moving mean and variance (Keras' "Total params": 24,908 / 221,794 / 78,666 / 269,992).
    Unset shape arguments default to the preset's reference input."""
    if isinstance(arch, dict):
        arch = parse_architecture(arch)
    ref = REFERENCE.get(arch.family, {})
    c, h, w = ref.get("input", (None, None, None))
    image_size = tuple(image_size) if image_size is not None else (h, w)
    in_ch = in_ch if in_ch is not None else c
    classes = classes if classes is not None else ref.get("classes")
    if None in (*image_size, in_ch, classes):
        raise ValueError(f"family {arch.family}: give image_size, in_ch and classes (no reference input)")
    from kiln.registry import implementation

    module = implementation(arch)
    p = module.plan(arch, image_size, in_ch, classes)
    return p.params + bn_per_channel * p.bn_channels
