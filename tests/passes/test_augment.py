"""Online augmentation per modality (dataset.augment) and the fit loop's recipes (training.schedule,
weight_decay, early_stopping): the schema refuses another modality's settings by name, each
augmentation does what it says on a known batch, raw samples through the front end equal the data
stage's features when nothing is drawn, and the defaults leave training as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kiln.schema import Project
from kiln.schema.datasets import (AudioAugment, CsvTableDataset, CsvWindowsDataset, DigitsDataset, ImageAugment,
                                  SensorAugment, raw_augmented)
from kiln.schema.project import Training
from passes.support import training
from tests.conftest import write_project


def windows(augment=None) -> CsvWindowsDataset:
    return CsvWindowsDataset(format="csv_windows", path="x", columns=["a", "b"], sample_rate=10, window=16,
                             stride=8, augment=augment or {})


# --- the schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make, augment, match", [
    (lambda a: DigitsDataset(format="digits", augment=a), {"time_shift_ms": 100},
     "time_shift_ms: an augmentation of audio samples; this format's samples are image samples"),
    (windows, {"rotate_deg": 5}, "rotate_deg: an augmentation of image samples.*jitter, scale, time_warp"),
    (lambda a: CsvTableDataset(format="csv_table", path="x", augment=a), {"jitter": 0.1},
     "jitter: an augmentation of sequence samples.*their augmentations: none"),
    (windows, {"scale": [1.2, 0.8]}, r"scale: \(1.2, 0.8\): give \(low, high\)"),
    (windows, {"time_warp": 0.5}, "time_warp: Input should be less than or equal to 0.2"),
    (windows, {"jiter": 0.1}, "jiter: not an augmentation"),
])
def test_a_setting_of_another_modality_or_out_of_bounds_is_refused_by_name(make, augment, match):
    with pytest.raises(ValueError, match=match):
        make(augment)


def test_audio_settings_are_checked_and_every_format_gets_its_layouts_model():
    from kiln.schema.datasets import AudioFoldersDataset

    with pytest.raises(ValueError, match=r"noise.snr_db: \(20.0, 5.0\)"):
        AudioFoldersDataset(format="audio_folders", path="x", augment={"noise": {"snr_db": [20, 5]}})
    ds = AudioFoldersDataset(format="audio_folders", path="x", augment={"gain_db": [-6, 6]})
    assert isinstance(ds.augment, AudioAugment) and raw_augmented(ds)
    assert isinstance(DigitsDataset(format="digits").augment, ImageAugment)
    assert isinstance(windows().augment, SensorAugment) and not raw_augmented(windows())
    # images without a front end are augmented as the net sees them: no raw split needed
    assert not raw_augmented(DigitsDataset(format="digits", augment={"rotate_deg": 5}))
    assert raw_augmented(DigitsDataset(format="digits", augment={"rotate_deg": 5}, front_end={"kind": "normalize"}))


def test_training_recipe_settings_are_bounded():
    base = {"epochs": 2, "lr": 0.01}
    assert Training(**base).schedule == "one_cycle" and Training(**base).early_stopping is None
    for bad, match in (({"schedule": "step"}, "schedule"), ({"weight_decay": -1}, "weight_decay"),
                       ({"early_stopping": {"patience": 0}}, "patience"), ({"early_stopping": {}}, "patience")):
        with pytest.raises(ValueError, match=match):
            Training(**base, **bad)


# --- each augmentation on a known batch -----------------------------------------------------------


def test_image_contrast_keeps_each_images_mean_and_draws_nothing_when_off():
    x = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    out = training.augment(x.clone(), ImageAugment(contrast=0.5), torch.Generator().manual_seed(0))
    assert torch.allclose(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-6)
    assert not torch.allclose(out, x)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = training.augment(x.clone(), ImageAugment(rotate_deg=5, brightness=0.2), g1)
    b = training.augment(x.clone(), ImageAugment(rotate_deg=5, brightness=0.2, contrast=0.0), g2)
    assert torch.equal(a, b) and torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_audio_time_shift_is_zero_filled_within_its_range():
    x = torch.arange(1, 101, dtype=torch.float32).repeat(32, 1)  # 100 samples at 1 kHz: 1 ms each
    out = training.augment_audio(x, AudioAugment(time_shift_ms=10), torch.Generator().manual_seed(0), 1000)
    shifts = set()
    for row in out:
        first = int(torch.nonzero(row)[0])
        shift = first if row[first] == 1 else -(int(row[0]) - 1)
        assert abs(shift) <= 10
        assert torch.equal(row, torch.roll(x[0], shift) * ((torch.arange(100) - shift >= 0) & (torch.arange(100) - shift < 100)))
        shifts.add(shift)
    assert len(shifts) > 5


def test_audio_noise_lands_at_the_drawn_snr_and_gain_within_its_range():
    gen = torch.Generator().manual_seed(0)
    x = (torch.sin(torch.arange(400) * 0.3) * 5000).repeat(64, 1)
    noise = torch.randn(3000, generator=gen) * 1000
    aug = AudioAugment(noise={"prob": 1.0, "snr_db": [10, 20]})
    out = training.augment_audio(x.clone(), aug, gen, 16000, noise, torch.tensor([0, 1000, 2000]))
    snr = 10 * torch.log10(x.pow(2).mean(1) / (out - x).pow(2).mean(1))
    assert snr.min() > 9.5 and snr.max() < 20.5 and snr.max() - snr.min() > 4
    none = training.augment_audio(x.clone(), AudioAugment(noise={"prob": 0.0}), gen, 16000, noise,
                                  torch.tensor([0, 1000, 2000]))
    assert torch.equal(none, x.round())
    loud = training.augment_audio(x.clone(), AudioAugment(gain_db=[-6, 6]), gen, 16000)
    ratio = 20 * torch.log10(loud.abs().amax(1) / x.abs().amax(1))
    assert ratio.min() >= -6.01 and ratio.max() <= 6.01 and ratio.max() - ratio.min() > 3
    assert training.augment_audio(x * 10, AudioAugment(gain_db=[6, 6]), gen, 16000).abs().max() <= 32768


def test_sensor_jitter_scale_and_time_warp():
    gen = torch.Generator().manual_seed(0)
    n, length = 256, 50
    ramp = torch.linspace(0, 1, length)[None, :, None].repeat(n, 1, 2) * torch.tensor([1.0, 100.0])
    std = torch.tensor([1.0, 100.0])
    jit = training.augment_sensor(ramp.clone(), SensorAugment(jitter=0.1), gen, std)
    got = (jit - ramp).reshape(-1, 2).std(0)
    assert torch.allclose(got, 0.1 * std, rtol=0.05)
    scaled = training.augment_sensor(ramp.clone(), SensorAugment(scale=[0.8, 1.2]), gen, std)
    factor = scaled[:, -1] / ramp[:, -1]  # (n, channels): one factor per window and channel
    assert factor.min() >= 0.8 and factor.max() <= 1.2 and not torch.allclose(factor[:, 0], factor[:, 1])
    warped = training.augment_sensor(ramp.clone(), SensorAugment(time_warp=0.1), gen, std)
    assert torch.allclose(warped[:, 0], ramp[:, 0]) and torch.allclose(warped[:, -1], ramp[:, -1])
    assert (warped[:, 1:, 0] >= warped[:, :-1, 0]).all()  # monotone: a resampling, never a reversal
    off = (warped[..., 0] - ramp[..., 0]).abs().max()
    assert 0.001 < off < 0.1  # within a few % of the window
    same = training.augment_sensor(ramp.clone(), SensorAugment(), gen, std)
    assert torch.equal(same, ramp)


# --- raw samples through the front end, end to end -----------------------------------------------


def _manifest(dataset: dict, arch: dict, **training_kw) -> dict:
    return {"name": "tiny", "requirements": {}, "dataset": {**dataset, "split": {"val": 0.2, "test": 0.2}},
            "architecture": arch, "targets": ["x86-host"],
            "training": {"epochs": 2, "batch": 16, "lr": 0.01, "seed": 0, "threads": 1, **training_kw}}


WINDOWS = {"format": "csv_windows", "path": "no/such", "columns": ["ax", "ay", "az"], "sample_rate": 50, "window": 16,
           "stride": 8, "synthetic": {"per_class": 10, "test_per_class": 4}}


def _data(kiln_env, dataset: dict, arch=None, **training_kw):
    from kiln import config
    from kiln.artifacts import Layout
    from passes import data

    arch = arch or ({"family": "rnn", "hidden": 8} if dataset["format"] == "csv_windows" else
                    {"family": "cnn", "widths": [4], "max_macs": 10_000_000})
    write_project(kiln_env["projects"], _manifest(dataset, arch, **training_kw))
    project = config.load_project("tiny")
    layout = Layout("tiny")
    data.synthesize(project, layout)
    return project, layout, data.run(project, layout)


class _Identity:
    """An augmentation model whose every setting is off, but 'on' (the raw path, nothing drawn)."""

    def __init__(self, aug):
        self.__dict__.update(aug.__dict__)


def test_raw_train_is_kept_only_when_raw_augmentation_is_on(kiln_env):
    project, layout, info = _data(kiln_env, WINDOWS)
    assert not layout.raw_train_npz.exists() and "raw_train.npz" not in info["files"]
    assert training.raw_batches(project, layout.data) is None
    project, layout, info = _data(kiln_env, {**WINDOWS, "augment": {"jitter": 0.05}})
    assert "raw_train.npz" in info["files"]
    with np.load(layout.raw_train_npz) as z:
        assert z["x"].dtype == np.float32 and z["x"].shape[1:] == (16, 3)
        assert np.array_equal(z["y"], np.load(layout.split("train"))["y"])


@pytest.mark.parametrize("dataset", [
    {**WINDOWS, "augment": {"jitter": 0.05}},
    {"format": "audio_folders", "path": "no/such", "synthetic": {"classes": 3, "per_class": 6, "test_per_class": 2},
     "augment": {"time_shift_ms": 50}},
    {"format": "gtsrb", "path": "no/such/dir", "synthetic": {"per_class": 4, "test_per_class": 2}, "image_size": [16, 16],
     "front_end": {"kind": "normalize"}, "augment": {"rotate_deg": 10, "contrast": 0.3}},
], ids=["sensor-normalize", "audio-mfcc", "image-uint8-normalize"])
def test_raw_batches_without_draws_equal_the_data_stages_features(kiln_env, dataset):
    project, layout, _ = _data(kiln_env, dataset)
    raw = training.raw_batches(project, layout.data)
    stored, _ = np.load(layout.split("train"))["x"], None
    raw.aug = type(raw.aug)()  # every augmentation off: the raw path must give the stored features
    idx = torch.arange(len(raw))
    got = raw(idx, torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy()
    assert got.shape == stored.shape
    np.testing.assert_allclose(got, stored, rtol=1e-5, atol=1e-5)
    raw.aug = project.dataset.augment  # and on, the batch differs
    assert not np.allclose(raw(idx, torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy(), stored)


def test_audio_noise_folder_is_read_by_the_data_stage_or_named_when_missing(kiln_env, tmp_path):
    from kiln.errors import PassError
    from passes.formats.audio_folders import wav_bytes

    audio = {"format": "audio_folders", "path": "no/such",
             "synthetic": {"classes": 3, "per_class": 6, "test_per_class": 2}}
    with pytest.raises(PassError, match="dataset.augment.noise: no WAV files in .*_background_noise_"):
        _data(kiln_env, {**audio, "augment": {"noise": {}}})
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "hum.wav").write_bytes(wav_bytes((np.arange(4000) % 50 * 100).astype(np.int16), 16000))
    (tmp_path / "noise" / "hiss.wav").write_bytes(wav_bytes(np.full(30000, 7, np.int16), 16000))
    project, layout, _ = _data(kiln_env, {**audio, "augment": {"noise": {"folder": str(tmp_path / "noise")}}})
    with np.load(layout.raw_train_npz) as z:  # the short clip repeats to one clip's length
        assert z["noise"].tolist()[:30000] == [7] * 30000 and len(z["noise"]) == 30000 + 16000
        assert z["noise_starts"].tolist() == [0, 30000]
    raw = training.raw_batches(project, layout.data)
    assert raw.noise is not None and len(raw) == len(np.load(layout.split("train"))["y"])


def test_train_stage_with_sensor_augmentation_and_a_recipe(kiln_env):
    from passes import train

    project, layout, _ = _data(kiln_env, {**WINDOWS, "augment": {"jitter": 0.05, "scale": [0.9, 1.1],
                                                                  "time_warp": 0.05}},
                               epochs=3, schedule="cosine", weight_decay=0.01)
    first = train.run(project, layout)
    again = train.run(project, layout)
    assert first["history"][-1]["loss"] == again["history"][-1]["loss"]  # seeded
    assert first["augment"]["jitter"] == 0.05 and first["training"]["schedule"] == "cosine"


# --- the recipes -----------------------------------------------------------------------------------


def _tiny_fit(recipe=None, epochs=3, **kw):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 8, 8, 1), dtype=np.uint8)
    y = (x.reshape(64, -1).mean(1) > 127).astype(np.int64)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    history = training.fit(model, x, y, epochs=epochs, batch=16, lr=0.01, aug=ImageAugment(),
                           gen=torch.Generator().manual_seed(0), xva=x[:16], yva=y[:16], recipe=recipe, **kw)
    return model, history


def test_default_recipe_is_the_loop_as_it_was():
    a, ha = _tiny_fit(None)
    b, hb = _tiny_fit(Training(epochs=3, lr=0.01))
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_schedules_and_weight_decay_choose_the_optimizer():
    model = torch.nn.Linear(2, 2)
    opt, sched = training._optimizer(model, 0.1, 10, Training(epochs=1, lr=0.1, schedule="constant"))
    assert type(opt) is torch.optim.Adam and sched is None
    opt, sched = training._optimizer(model, 0.1, 10, Training(epochs=1, lr=0.1, schedule="cosine", weight_decay=0.05))
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.05
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] < 1e-6
    opt, sched = training._optimizer(model, 0.1, 10, None)
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)
    # different schedules train differently
    assert _tiny_fit(Training(epochs=3, lr=0.01, schedule="constant"))[1][-1]["loss"] != _tiny_fit(None)[1][-1]["loss"]


def test_early_stopping_stops_after_patience_epochs_and_keeps_the_best():
    stop = Training(epochs=10, lr=0.01, early_stopping={"patience": 2, "min_delta": 1.0})  # nothing beats +1.0
    model, history = _tiny_fit(stop, epochs=10, keep_best=True)
    assert len(history) == 3  # the first epoch sets the best, two more without gain stop it
    full = _tiny_fit(Training(epochs=10, lr=0.01, early_stopping={"patience": 50}), epochs=10)[1]
    assert len(full) == 10
    assert math.isfinite(history[0]["loss"])
