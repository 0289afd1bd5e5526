"""Synthetic detection scenes: GTSRB's drawn signs (support/gtsrb_synth.py) pasted into cluttered
street-like scenes, at several sizes, several per scene, some scenes with none, written by each
detection format in its own layout (gtsdb, yolo, coco, voc).

``scenes(syn, sign_ids)`` yields (image, boxes) per scene, deterministically: scene ``i`` draws
from its own stream seeded by (seed, i), so a scene never depends on how many others are drawn.
Boxes are (class index, x1, y1, x2, y2): inclusive pixel corners of the sign's opaque part, as
GTSDB's gt.txt gives them (the continuous box spans x1 .. x2 + 1).
"""

from __future__ import annotations

import io
import math
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from passes.formats.support import gtsrb_synth as signs

GENERATOR_VERSION = 1  # bump whenever the drawing changes, so cached trees are regenerated

# GTSRB's 43 classes by id (the German names' usual English short forms)
GTSRB_NAMES = (
    "speed_20", "speed_30", "speed_50", "speed_60", "speed_70", "speed_80", "end_speed_80", "speed_100", "speed_120",
    "no_passing", "no_passing_trucks", "right_of_way", "priority_road", "yield", "stop", "no_vehicles", "no_trucks",
    "no_entry", "caution", "curve_left", "curve_right", "double_curve", "bumpy_road", "slippery_road",
    "road_narrows", "road_work", "traffic_signals", "pedestrians", "children", "bicycles", "ice_snow",
    "wild_animals", "end_of_limits", "turn_right", "turn_left", "ahead_only", "straight_or_right",
    "straight_or_left", "keep_right", "keep_left", "roundabout", "end_no_passing", "end_no_passing_trucks",
)
# the order synthetic.classes takes signs in: the first few look unlike each other (shape, colour)
PREFERRED = (14, 17, 13, 12, 1, 38, 25, 33, 18, 40, 2, 35, 11, 26, 4, 9)
ORDER = PREFERRED + tuple(i for i in range(len(GTSRB_NAMES)) if i not in PREFERRED)


def default_ids(syn) -> list[int]:
    """The GTSRB ids drawn when dataset.classes is not listed: the first synthetic.classes of ORDER."""
    return list(ORDER[:syn.classes])


def names_and_ids(ds) -> tuple[list[str], list[int]]:
    """A named format's synthetic classes: dataset.classes when listed (a GTSRB name draws that
    sign, another name the next sign of ORDER), else the first synthetic.classes of ORDER."""
    if ds.classes:
        return list(ds.classes), [GTSRB_NAMES.index(n) if n in GTSRB_NAMES else ORDER[k % len(ORDER)]
                                  for k, n in enumerate(ds.classes)]
    ids = default_ids(ds.synthetic)
    return [GTSRB_NAMES[i] for i in ids], ids


_CLUTTER = np.array([(70, 70, 75), (120, 110, 100), (60, 100, 50), (150, 150, 155), (90, 60, 45), (190, 185, 170),
                     (40, 55, 80)], np.float32)


def _scene_background(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Sky over a road, with buildings, trees, poles and blobs: edges and colours for a detector
    to tell from signs."""
    img = signs._background(w, h, rng)
    d = ImageDraw.Draw(img)
    horizon = int(h * rng.uniform(0.35, 0.6))
    road = tuple(int(v) for v in np.clip(_CLUTTER[0] + rng.normal(0, 12, 3), 0, 255))
    d.polygon([(0, h), (w, h), (w * rng.uniform(0.55, 0.7), horizon), (w * rng.uniform(0.3, 0.45), horizon)], fill=road)
    for _ in range(int(rng.integers(4, 12))):  # buildings, trees, blobs, poles
        c = tuple(int(v) for v in np.clip(_CLUTTER[rng.integers(len(_CLUTTER))] + rng.normal(0, 18, 3), 0, 255))
        kind = rng.integers(4)
        x, y = rng.uniform(0, w), rng.uniform(0, horizon)
        s = rng.uniform(0.05, 0.3) * min(w, h)
        if kind == 0:
            d.rectangle((x, y, x + s * rng.uniform(0.6, 1.8), horizon + 2), fill=c)
        elif kind == 1:
            d.ellipse((x - s / 2, y - s / 2, x + s / 2, y + s / 2), fill=c)
        elif kind == 2:
            pw = max(1, int(s * 0.06))
            d.rectangle((x - pw, y, x + pw, h), fill=c)
        else:
            d.polygon([(x + s * math.cos(a), y + s * math.sin(a)) for a in np.sort(rng.uniform(0, 6.28, 5))], fill=c)
    return img


def _sign(cid: int, side: int, rng: np.random.Generator) -> Image.Image:
    """GTSRB's template of class ``cid`` (the sign ~100 of 128 px) scaled so that the sign is
    about ``side`` pixels, slightly rotated."""
    t = max(8, round(side * signs._T / 100))
    angle = float(np.clip(rng.normal(0, 4), -10, 10))
    return signs._template(cid).resize((2 * t, 2 * t), Image.BILINEAR).rotate(angle, Image.BILINEAR).reduce(2)


def _overlaps(box, placed, gap: int = 2) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 <= b[2] + gap and b[0] <= x2 + gap and y1 <= b[3] + gap and b[1] <= y2 + gap for b in placed)


def scene(syn, sign_ids: list[int], i: int) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """Scene ``i``: (H x W x 3 uint8, [(class index, x1, y1, x2, y2) inclusive pixel corners])."""
    rng = np.random.default_rng([syn.seed, 7, i])
    h, w = syn.scene_size
    img = _scene_background(w, h, rng)
    empty = syn.max_per_scene == 0 or rng.random() < syn.empty
    count = 0 if empty else int(rng.integers(1, syn.max_per_scene + 1))
    boxes: list[tuple[int, int, int, int, int]] = []
    for _ in range(count):
        k = int(rng.integers(len(sign_ids)))
        side = int(round(math.exp(rng.uniform(*np.log(syn.sign_px)))))  # small signs are commoner
        sign = _sign(sign_ids[k], side, rng)
        alpha = sign.getchannel("A").point(signs._OPAQUE)
        bx1, by1, bx2, by2 = alpha.getbbox() or (0, 0, sign.width, sign.height)
        for _try in range(20):  # a place where it overlaps no other sign, else it is left out
            x0 = int(rng.integers(-bx1, w - bx2 + 1))
            y0 = int(rng.integers(-by1, h - by2 + 1))
            box = (x0 + bx1, y0 + by1, x0 + bx2 - 1, y0 + by2 - 1)
            if not _overlaps(box, [b[1:] for b in boxes]):
                break
        else:
            continue
        if rng.random() < 0.5:  # its pole
            pw = max(1, round(side * 0.06))
            cx = (box[0] + box[2]) // 2
            ImageDraw.Draw(img).rectangle((cx - pw, box[3], cx + pw, h), fill=(130, 130, 125))
        img.paste(sign, (x0, y0), sign)
        boxes.append((k, *box))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.7)))
    a = np.asarray(img, np.float32) * rng.uniform(0.7, 1.2) + rng.normal(0, rng.uniform(1, 6), (h, w, 3))
    return np.clip(a + 0.5, 0, 255).astype(np.uint8), boxes


def scenes(syn, sign_ids: list[int]) -> Iterator[tuple[np.ndarray, list[tuple[int, int, int, int, int]]]]:
    for i in range(syn.scenes):
        yield scene(syn, sign_ids, i)


def marker(fmt: str, syn, names: list[str], ids: list[int]) -> dict:
    return {"generator": f"kiln synthetic {fmt}", "version": GENERATOR_VERSION, **syn.model_dump(mode="json"),
            "class_names": names, "gtsrb_ids": ids}


def encode(x: np.ndarray, fmt: str = "JPEG") -> bytes:
    """The image's bytes, without metadata: the same pixels always give the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()
