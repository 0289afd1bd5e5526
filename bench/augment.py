"""What each augmentation does to accuracy on real data: the same app, the same seed, trained
with each augmentation of its modality alone, all of them together, and none.

    .venv/bin/python bench/augment.py [--only basic_motions,digits_images,tts_words] [--smoke]

The sets and their manifests are bench/real_data.py's (tests/realdata.py writes them from what
packages ship: sktime's BasicMotions, scikit-learn's digits, espeak-ng speech, which is synthesized,
not recorded). Each row is one ``doit train:<app>`` in a scratch build (data stage, then training
with dataset.augment set as the row says); figures are the float model's top-1 on the validation
split (its best epoch, the one kept) and on the test split. The audio rows mix in a noise folder
this bench writes (white, brown and hum noise: generated, not recorded) as ``augment.noise.folder``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import real_data  # noqa: E402

# each modality's augmentations, one at a time, then together (the values a hand-written script
# would start from)
VARIANTS = {
    "sequence": {"jitter": {"jitter": 0.05}, "scale": {"scale": [0.9, 1.1]}, "time_warp": {"time_warp": 0.05}},
    "image": {"rotate_deg": {"rotate_deg": 10}, "brightness": {"brightness": 0.2}, "contrast": {"contrast": 0.2},
              "blur": {"blur": 0.2}},
    "audio": {"time_shift_ms": {"time_shift_ms": 100}, "noise": {"noise": {"prob": 0.8, "snr_db": [5, 20]}},
              "gain_db": {"gain_db": [-6, 6]}},
}


def noise_folder(dest: Path, seconds: int = 8, rate: int = 16000) -> Path:
    """Three generated noise recordings (white, brown, a 50 Hz hum with harmonics), 16-bit mono."""
    rng = np.random.default_rng(0)
    dest.mkdir(parents=True, exist_ok=True)
    n = seconds * rate
    t = np.arange(n) / rate
    brown = np.cumsum(rng.normal(0, 1, n))
    brown -= np.convolve(brown, np.ones(801) / 801, mode="same")  # no drift
    clips = {"white": rng.normal(0, 1, n), "brown": brown,
             "hum": sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 6)) + rng.normal(0, 0.1, n)}
    for name, x in clips.items():
        x = x / np.abs(x).max() * 8000
        with wave.open(str(dest / f"{name}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(np.rint(x).astype("<i2").tobytes())
    return dest


def rows_for(name: str, manifest: dict, modality: str, noise: Path | None) -> list[tuple[str, dict]]:
    """(variant, manifest) pairs: none, each augmentation alone, all together."""
    variants = copy.deepcopy(VARIANTS[modality])
    if "noise" in variants.get("noise", {}):
        variants["noise"]["noise"]["folder"] = str(noise)
    out = [("none", {})] + list(variants.items())
    together = {}
    for aug in variants.values():
        together.update(aug)
    out.append(("all", together))
    result = []
    for variant, augment in out:
        m = copy.deepcopy(manifest)
        m["name"] = f"{name}_{variant}"
        m["dataset"]["augment"] = augment
        result.append((variant, m))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None,
                    help="comma list of bench/real_data.py's sets with augmentations (basic_motions, digits_images, "
                    "tts_words); default basic_motions,digits_images (--smoke: basic_motions)")
    ap.add_argument("--smoke", action="store_true", help="a few epochs on the smallest sets: a check that it runs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-augment-") as tmp:
        tmp = Path(tmp)
        wanted = (args.only or ("basic_motions" if args.smoke else "basic_motions,digits_images")).split(",")
        chosen = {k: v for k, v in real_data.sets(tmp / "data", args.smoke).items() if k in wanted}
        noise = noise_folder(tmp / "noise")
        table = []
        for name, (what, manifest, modality) in chosen.items():
            if modality not in VARIANTS:
                print(f"{name}: {modality} samples have no augmentation; skipped")
                continue
            print(f"{name}: {what}", flush=True)
            for variant, m in rows_for(name, manifest, modality, noise):
                run = real_data.kiln_train(m["name"], m, tmp / "projects", tmp / "build")
                met = run["metrics"]
                table.append((name, variant, met["val_accuracy"], met["test_accuracy"], met["best_epoch"],
                              run["seconds"], m["dataset"]["augment"]))
                print(f"  {variant:<14} val {met['val_accuracy']:.4f} test {met['test_accuracy']:.4f} "
                      f"({run['seconds']:.0f} s)", flush=True)
        head = f"{'set':<15} {'augmentation':<14} {'val top-1':>9} {'Δ val':>7} {'test top-1':>10} {'Δ test':>7} {'best ep':>7} {'s':>5}  settings"
        print("\nOne seed (training.seed 0, split seed 0), each row its own train run\n" + head + "\n" + "-" * len(head))
        base = {}
        for name, variant, va, te, ep, secs, aug in table:
            if variant == "none":
                base[name] = (va, te)
            bva, bte = base[name]
            print(f"{name:<15} {variant:<14} {va:>9.4f} {va - bva:>+7.4f} {te:>10.4f} {te - bte:>+7.4f} {ep:>7d} "
                  f"{secs:>5.0f}  {aug}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
