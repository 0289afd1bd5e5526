"""Front ends (``FrontEnd``, by ``kind``): raw samples -> the net's C x H x W input, inside the
kernel library. Each settings model names its torch module (``implementation``,
passes/frontends/<kind>.py) and holds its torch-free shape and cost code in ``shapes``
(kiln/frontends/<kind>.py), as a net family's model names kiln/nets/<family>.py."""

from __future__ import annotations

from types import ModuleType
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, field_validator, model_validator

from kiln.frontends import logmel as _logmel, mfcc as _mfcc, normalize as _normalize, spectral as _spectral
from kiln.schema.base import Strict


class _FrontEndBase(Strict):
    """A front end runs inside the kernel library: the board is fed raw samples (int16 audio,
    uint8 pixels, raw sensor values) and the library computes the features. The host computes
    the same features with the same graph for training (passes/frontends/)."""

    implementation: ClassVar[str]
    shapes: ClassVar[ModuleType]  # kiln/frontends/<kind>.py: output_shape, cost (torch-free)
    layouts: ClassVar[tuple[str, ...]]  # raw layouts it takes (see _DatasetBase.layout)

    def output_shape(self, layout: str, raw_shape: tuple[int, ...], sample_rate: float | None = None
                     ) -> tuple[int, int, int]:
        return self.shapes.output_shape(self, layout, raw_shape, sample_rate)

    def cost(self, layout: str, raw_shape: tuple[int, ...], sample_rate: float | None = None) -> tuple[int, int]:
        """(float32 constants, multiply-accumulates) per sample, for kiln/sizing.py: the front end
        runs in float inside the library, also in an int8 one."""
        return self.shapes.cost(self, layout, raw_shape, sample_rate)


class _SpectralFrontEnd(_FrontEndBase):
    """Framed power spectrum -> mel bands -> log, as matmuls against fixed bases (TVM's ONNX
    frontend has no STFT or DFT). Defaults are MLPerf Tiny keyword spotting's: 30 ms windows
    every 20 ms, a 512-point FFT, 40 mel bands from 20 to 4000 Hz (49 frames per second at 16 kHz).
    int16 values scaled by 1/32768, periodic Hann window, power spectrum (re^2 + im^2), HTK mel
    triangles of peak 1 (tf.signal's), no padding: passes/frontends/support/spectral.py."""

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
        return _spectral.window(self, sample_rate)

    def frames(self, length: int, sample_rate: float) -> int:
        return _spectral.frames(self, length, sample_rate)

    def bins(self) -> int:
        return self.mels


class MfccFrontEnd(_SpectralFrontEnd):
    """Log-mel energies, then a DCT-II (orthonormal) to ``coefficients`` cepstral coefficients:
    passes/frontends/mfcc.py. Output 1 x frames x coefficients."""

    implementation: ClassVar[str] = "passes.frontends.mfcc"
    shapes: ClassVar[ModuleType] = _mfcc
    kind: Literal["mfcc"]
    coefficients: int = Field(10, ge=1, le=256, description="DCT coefficients kept (at most mels)")

    @model_validator(mode="after")
    def _coefficients(self):
        if self.coefficients > self.mels:
            raise ValueError(f"coefficients ({self.coefficients}) must be at most mels ({self.mels})")
        return self

    def bins(self) -> int:
        return self.coefficients


class LogmelFrontEnd(_SpectralFrontEnd):
    """Log-mel energies: passes/frontends/logmel.py. Output 1 x frames x mels."""

    implementation: ClassVar[str] = "passes.frontends.logmel"
    shapes: ClassVar[ModuleType] = _logmel
    kind: Literal["logmel"]


class NormalizeFrontEnd(_FrontEndBase):
    """(x * scale - mean) / std per channel: passes/frontends/normalize.py. Pixels (uint8, scale
    1/255 by default), sensor values and table features; mean and std are fitted on the
    training split when not given (a fitted std under 1e-6, a constant channel, is taken as 1).
    Output: an image's C x H x W, a sequence's C x 1 x L, a table's 1 x 1 x F."""

    implementation: ClassVar[str] = "passes.frontends.normalize"
    shapes: ClassVar[ModuleType] = _normalize
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


FrontEnd = Annotated[Union[MfccFrontEnd, LogmelFrontEnd, NormalizeFrontEnd], Field(discriminator="kind")]
