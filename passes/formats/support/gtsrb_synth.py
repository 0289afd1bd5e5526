"""Synthetic GTSRB: 43 classes of drawn traffic signs written in the real GTSRB on-disk layout.

No data set can be downloaded on the build machines, so this draws a stand-in (shapes, colours,
glyphs under rotation, scale, lighting, blur, noise and partial occlusion) that the data pass
(passes/formats/gtsrb.py) loads exactly like the real GTSRB.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from kiln.errors import PassError
from passes.formats import MARKER, write_tree  # noqa: F401 (MARKER: gtsrb.py reads it from here)

log = logging.getLogger("kiln.data")

NUM_CLASSES = 43
GENERATOR_VERSION = 1  # bump whenever the drawing changes, so cached trees are regenerated
CSV_COLUMNS = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
TEST_CSV = "GT-final_test.csv"

# ----------------------------------------------------------------------------------------------
# Glyphs: primitives in glyph units (u, v in about [-1, 1], v down), drawn at 4x and downscaled.
# ("L", width, points, colour) polyline; ("P", points, colour) polygon; ("E", box, colour) filled
# ellipse; ("A", box, a0, a1, width, colour) arc, clockwise in degrees as PIL draws it.
# colour None = the family's glyph colour.


def L(w, *pts, c=None):
    return ("L", w, pts, c)


def P(*pts, c=None):
    return ("P", pts, c)


def A(box, a0, a1, w, c=None):
    return ("A", box, a0, a1, w, c)


def O(box, w, c=None):
    return A(box, 0, 360, w, c)


def R(u0, v0, u1, v1, c=None):
    return P((u0, v0), (u1, v0), (u1, v1), (u0, v1), c=c)


def E(u0, v0, u1, v1, c=None):
    return ("E", (u0, v0, u1, v1), c)


def _move(prims, dx, dy, k=1.0):
    """Scale by k then shift: lets digits and figures be defined once in their own cell."""
    f = lambda p: (dx + p[0] * k, dy + p[1] * k)  # noqa: E731
    out = []
    for p in prims:
        if p[0] == "L":
            out.append(("L", p[1] * k, tuple(map(f, p[2])), p[3]))
        elif p[0] == "P":
            out.append(("P", tuple(map(f, p[1])), p[2]))
        else:
            box = f(p[1][:2]) + f(p[1][2:])
            out.append(("E", box, p[2]) if p[0] == "E" else ("A", box, p[2], p[3], p[4] * k, p[5]))
    return out


def _mirror(prims):
    """Left/right twins (curve left/right, keep left/right ...) are mirror images."""
    out = []
    for p in prims:
        if p[0] == "L":
            out.append(("L", p[1], tuple((-u, v) for u, v in p[2]), p[3]))
        elif p[0] == "P":
            out.append(("P", tuple((-u, v) for u, v in p[1]), p[2]))
        else:
            u0, v0, u1, v1 = p[1]
            box = (-u1, v0, -u0, v1)
            out.append(("E", box, p[2]) if p[0] == "E" else ("A", box, 180 - p[3], 180 - p[2], p[4], p[5]))
    return out


def _recolour(prims, c):
    return [p[:-1] + (c,) for p in prims]


def _arrow(w, *pts, head=0.42, c=None):
    """Polyline ending in a triangular head that points along its last segment."""
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    n = math.hypot(x1 - x0, y1 - y0)
    dx, dy = (x1 - x0) / n, (y1 - y0) / n
    tip = (x1 + dx * head, y1 + dy * head)
    side = ((x1 - dy * head * 0.8, y1 + dx * head * 0.8), (x1 + dy * head * 0.8, y1 - dx * head * 0.8))
    return [L(w, *pts, c=c), P(tip, *side, c=c)]


# Stroke digits and letters in a cell 1 wide, 2 tall: no font file, same pixels everywhere.
_CHARS = {
    "0": [O((0, 0, 1, 2), .4)],
    "1": [L(.4, (0.1, 0.5), (0.65, 0.05), (0.65, 2))],
    "2": [A((0.02, 0.02, 0.98, 1.0), 180, 400, .4), L(.4, (0.87, 0.83), (0.05, 1.84), (1, 1.84))],
    "3": [A((0.05, 0, 0.95, 1.0), 200, 450, .4), A((0, 1, 1, 2), 270, 520, .4)],
    "5": [L(.4, (0.95, 0.12), (0.2, 0.12), (0.12, 0.95)), A((0, 0.75, 1, 2), 210, 520, .4)],
    "6": [O((0, 0.8, 1, 2), .4), L(.4, (0.85, 0.1), (0.4, 0.35), (0.12, 0.85), (0.05, 1.4))],
    "7": [L(.4, (0, 0.12), (1, 0.12), (0.35, 2))],
    "8": [O((0.1, 0, 0.9, 0.96), .38), O((0, 0.9, 1, 2), .4)],
    "S": [A((0, 0, 1, 1), 90, 330, .4), A((0, 1, 1, 2), 270, 510, .4)],
    "T": [L(.4, (0, 0.12), (1, 0.12)), L(.4, (0.5, 0.12), (0.5, 2))],
    "O": [O((0, 0, 1, 2), .4)],
    "P": [L(.4, (0.15, 2), (0.15, 0.12), (0.5, 0.12)), A((0, 0.12, 1, 1.12), 270, 450, .4),
          L(.4, (0.5, 1.12), (0.15, 1.12))],
}


def _text(s, h, cy=0.0):
    k, gap = h / 2, h * 0.17
    x = -(len(s) * k + (len(s) - 1) * gap) / 2
    out = []
    for ch in s:
        out += _move(_CHARS[ch], x, cy - h / 2, k)
        x += k + gap
    return out


def _car(x, c=None):  # rear view, as on the no-passing signs
    return [R(x - .36, -.05, x + .36, .32, c), P((x - .26, -.05), (x - .18, -.36), (x + .18, -.36),
                                                  (x + .26, -.05), c=c),
            R(x - .33, .32, x - .18, .48, c), R(x + .18, .32, x + .33, .48, c)]


def _truck(x, c=None):
    return [R(x - .4, -.55, x + .4, .3, c), R(x - .36, .3, x - .18, .48, c), R(x + .18, .3, x + .36, .48, c)]


_PERSON = [E(-.12, -1.2, .2, -.88), L(.28, (.03, -.8), (0, .05)), L(.22, (0, .05), (-.35, .9)),
           L(.22, (0, .05), (.3, .9)), L(.16, (-.35, -.2), (0, -.62), (.35, -.25))]
_STRIPES = [L(.055, (o / 1.41 - 1.2, o / 1.41 + 1.2), (o / 1.41 + 1.2, o / 1.41 - 1.2), c=(60, 60, 60))
            for o in (-.3, -.15, 0, .15, .3)]


def _round_arrows():
    """Roundabout: three arcs on one circle, each ending in a head along the tangent."""
    out = []
    for a in (20, 140, 260):
        pt = lambda d: (.6 * math.cos(math.radians(d)), .6 * math.sin(math.radians(d)))  # noqa: E731
        out += [A((-.6, -.6, .6, .6), a, a + 75, .22)] + _arrow(.01, pt(a + 70), pt(a + 80), head=.3)
    return out


_RED, _BLACK, _GREY = (200, 30, 35), (20, 20, 20), (95, 95, 95)


def _speed(n):
    return _text(str(n), 1.1 if n < 100 else 0.9)


def _class_table():
    """(family, glyph) per GTSRB ClassId, in the real class order."""
    curve_left = _arrow(.3, (.35, .9), (.35, -.1), (-.2, -.7))
    straight_right = _arrow(.26, (-.2, .85), (-.2, -.45)) + _arrow(.26, (-.2, .3), (.15, -.05), (.4, -.05))
    t = {i: ("ring", _speed(n)) for i, n in zip((0, 1, 2, 3, 4, 5, 7, 8), (20, 30, 50, 60, 70, 80, 100, 120))}
    t.update({
        6: ("end", _recolour(_speed(80), _GREY) + _STRIPES),
        9: ("ring", _move(_car(-.43, _RED) + _car(.43), 0, 0, 1.2)),
        10: ("ring", _move(_truck(-.43, _RED) + _car(.43), 0, 0, 1.2)),
        11: ("warn", [L(.45, (0, -1.3), (0, .9)), L(.2, (-.8, -.1), (.8, -.1))]),
        12: ("priority", []),
        13: ("yield", []),
        14: ("stop", _text("STOP", .5)),
        15: ("ring", []),
        16: ("ring", _move(_truck(0), 0, 0, 1.2)),
        17: ("noentry", [R(-.75, -.17, .75, .17)]),
        18: ("warn", [L(.42, (0, -1.2), (0, .25)), E(-.22, .5, .22, .94)]),
        19: ("warn", curve_left),
        20: ("warn", _mirror(curve_left)),
        21: ("warn", _arrow(.26, (.2, .9), (.2, .35), (-.3, -.05), (.15, -.55), (.05, -.9), head=.35)),
        22: ("warn", [A((-.85, -.3, 0, .7), 180, 360, .28), A((0, -.3, .85, .7), 180, 360, .28)]),
        23: ("warn", _move(_car(0), 0, -.55, .9) + [L(.15, (-.6, .1), (-.3, .4), (-.6, .75)),
                                                    L(.15, (.25, .1), (.55, .4), (.25, .75))]),
        24: ("warn", [L(.22, (-.4, .9), (-.4, -1.2)), L(.22, (.45, .9), (.45, .1), (.1, -.35), (.1, -1.2))]),
        25: ("warn", [E(-.1, -1.05, .2, -.75), L(.25, (0, -.7), (-.25, 0)), L(.2, (-.25, 0), (-.5, .85)),
                      L(.2, (-.25, 0), (.05, .85)), L(.15, (-.05, -.5), (.5, 0), (.75, .6)),
                      P((.35, .95), (.65, .5), (.95, .95))]),
        26: ("warn", [R(-.35, -1.25, .35, .9), E(-.22, -1.1, .22, -.66, _RED),
                      E(-.22, -.55, .22, -.11, (240, 190, 20)), E(-.22, 0, .22, .44, (30, 160, 60))]),
        27: ("warn", _PERSON),
        28: ("warn", _move(_PERSON, -.35, .05, .85) + _move(_PERSON, .4, .35, .6)),
        29: ("warn", [O((-.9, .05, -.2, .75), .14), O((.2, .05, .9, .75), .14),
                      L(.14, (-.55, .4), (-.15, -.2), (.55, .4), (.1, -.35), (-.2, -.35))]),
        30: ("warn", _move([L(.16, (0, -1), (0, 1)), L(.16, (-.87, -.5), (.87, .5)),
                            L(.16, (-.87, .5), (.87, -.5))], 0, -.1, .95)),
        31: ("warn", [P((-.6, -.1), (.3, -.3), (.5, -.15), (.2, .15), (-.5, .2)),
                      P((.3, -.3), (.55, -.8), (.8, -.75), (.5, -.15)),
                      L(.12, (-.5, .15), (-.8, .8)), L(.12, (-.35, .15), (-.3, .85)),
                      L(.12, (.15, .1), (.45, .75)), L(.12, (.05, .1), (0, .85)),
                      L(.08, (.6, -.8), (.5, -1.15)), L(.08, (.7, -.8), (.9, -1.1))]),
        32: ("end", _STRIPES),
        33: ("blue", _arrow(.28, (-.35, .8), (-.35, -.1), (.35, -.1))),
        34: ("blue", _mirror(_arrow(.28, (-.35, .8), (-.35, -.1), (.35, -.1)))),
        35: ("blue", _arrow(.3, (0, .85), (0, -.45))),
        36: ("blue", straight_right),
        37: ("blue", _mirror(straight_right)),
        38: ("blue", _arrow(.3, (-.45, -.45), (.25, .25))),
        39: ("blue", _mirror(_arrow(.3, (-.45, -.45), (.25, .25)))),
        40: ("blue", _round_arrows()),
        41: ("end", _move(_car(-.43, _GREY) + _car(.43, _GREY), 0, 0, 1.2) + _STRIPES),
        42: ("end", _move(_truck(-.43, _GREY) + _car(.43, _GREY), 0, 0, 1.2) + _STRIPES),
    })
    return [t[i] for i in range(NUM_CLASSES)]


# ----------------------------------------------------------------------------------------------
# Sign templates: each class drawn once, 128 px RGBA with the sign ~100 px across (the padding
# leaves room to rotate), supersampled 4x so edges are anti-aliased.

_T, _SS = 128, 4
_WHITE, _BLUE, _YELLOW = (238, 238, 232), (25, 75, 165), (245, 180, 25)


def _draw_prims(d, prims, cx, cy, g, colour):
    """Draw glyph-unit primitives centred at (cx, cy) with g canvas pixels per unit."""
    m = lambda u, v: (cx + u * g, cy + v * g)  # noqa: E731
    for p in prims:
        c = p[-1] or colour
        if p[0] == "L":
            d.line([m(*q) for q in p[2]], fill=c, width=max(1, round(p[1] * g)), joint="curve")
        elif p[0] == "P":
            d.polygon([m(*q) for q in p[1]], fill=c)
        elif p[0] == "E":
            d.ellipse(m(*p[1][:2]) + m(*p[1][2:]), fill=c)
        else:
            d.arc(m(*p[1][:2]) + m(*p[1][2:]), p[2], p[3], fill=c, width=max(1, round(p[4] * g)))


def _disc(r, c=None):
    return E(64 - r, 64 - r, 64 + r, 64 + r, c)


def _ngon(n, r, rot, c=None):
    return P(*[(64 + r * math.cos(math.radians(rot + 360 * i / n)),
                64 + r * math.sin(math.radians(rot + 360 * i / n))) for i in range(n)], c=c)


def _tri(f, c=None, flip=False):
    """Equilateral triangle (half-width 48) scaled by f about its centroid; flip = yield sign."""
    pts = [(64, 22.4), (16, 105.6), (112, 105.6)]
    cy = 77.9
    pts = [(64 + (x - 64) * f, cy + (y - cy) * f) for x, y in pts]
    return P(*[(x, 128 - y) if flip else (x, y) for x, y in pts], c=c)


# family -> (body primitives in template px, glyph mask, glyph centre, px per glyph unit, colour)
_FAMILIES = {
    "ring": ([_disc(50, _RED), _disc(41, _WHITE)], _disc(41), (64, 64), 30, _BLACK),
    "end": ([_disc(50, (70, 70, 70)), _disc(48.5, _WHITE)], _disc(48.5), (64, 64), 30, _GREY),
    "blue": ([_disc(50, _WHITE), _disc(48, _BLUE)], _disc(48), (64, 64), 34, _WHITE),
    "noentry": ([_disc(50, _WHITE), _disc(48.5, _RED)], _disc(48.5), (64, 64), 40, _WHITE),
    "warn": ([_tri(1.0, _WHITE), _tri(.94, _RED), _tri(.6, _WHITE)], _tri(.6), (64, 76), 22, _BLACK),
    "yield": ([_tri(1.0, _WHITE, True), _tri(.94, _RED, True), _tri(.58, _WHITE, True)], None, (64, 64), 1, _BLACK),
    "stop": ([_ngon(8, 52, 22.5, _WHITE), _ngon(8, 50, 22.5, _RED)], _ngon(8, 50, 22.5), (64, 64), 40, _WHITE),
    "priority": ([_ngon(4, 52, 0, (40, 40, 40)), _ngon(4, 50.5, 0, _WHITE), _ngon(4, 33, 0, _YELLOW)],
                 None, (64, 64), 1, _BLACK),
}


@functools.lru_cache(maxsize=None)
def _template(cid: int) -> Image.Image:
    family, glyph = _class_table()[cid]
    body, mask_shape, (gx, gy), g, colour = _FAMILIES[family]
    S = _T * _SS
    img = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    _draw_prims(ImageDraw.Draw(img), body, 0, 0, _SS, None)
    if glyph:
        # glyphs are clipped to the sign's inner field so none can bleed over the rim
        layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
        _draw_prims(ImageDraw.Draw(layer), glyph, gx * _SS, gy * _SS, g * _SS, colour)
        mask = Image.new("L", (S, S), 0)
        _draw_prims(ImageDraw.Draw(mask), [mask_shape], 0, 0, _SS, 255)
        img.paste(layer, (0, 0), ImageChops.multiply(layer.getchannel("A"), mask))
    return img.resize((_T, _T), Image.LANCZOS)


# ----------------------------------------------------------------------------------------------
# One synthetic photo: the sign under random pose, size, lighting, blur, noise and occlusion on a
# random background with a margin, like GTSRB's cut-outs (the ROI is the sign's box).

_SCENERY = np.array([(150, 180, 220), (60, 95, 45), (35, 35, 40), (125, 120, 112), (205, 195, 165),
                     (95, 70, 50), (175, 175, 180)], np.float32)
# How hard the photos are. Tuned on the traffic_signs reference net (conv 16-32-64 + GAP head,
# 8 epochs at 32x32, per_class 200): ~0.98 test accuracy with a constant Adam lr 3e-3 and ~0.99
# through passes/train.py (one-cycle lr); harder settings (gain down to 0.3-0.4, more blur and
# occlusion) left that GAP net at 0.87-0.95, while the flatten head was at ~0.999 on every setting.
_HARD = {"size_px": (32, 65), "rotate_sd": 5, "fade": 0.25, "occlude_p": 0.1, "occlude_r": (0.15, 0.35),
         "blur": 0.6, "gain": (0.5, 1.3), "gamma_sd": 0.2, "haze_p": 0.3, "noise": 0.04}
_OPAQUE = [0] * 97 + [255] * 159  # alpha LUT: where the sign counts as present for its ROI


def _background(w, h, rng):
    base = _SCENERY[rng.integers(len(_SCENERY))] + rng.normal(0, 20, 3)
    k = int(rng.integers(2, 6))
    # mostly brightness variation with a little colour, like foliage, sky and walls
    var = rng.normal(0, 30, (k, k, 1)) + rng.normal(0, 12, (k, k, 3))
    coarse = np.clip(base + var, 0, 255).astype(np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BICUBIC)


def _occlude(img, roi, rng):
    """A blob (branch, sticker, another sign) covering part of the sign from one of its sides."""
    x1, y1, x2, y2 = roi
    cx, cy = rng.uniform(x1, x2), rng.uniform(y1, y2)
    side = rng.integers(4)  # pull the centre onto one edge so the sign stays mostly visible
    cx, cy = [(x1, cy), (x2, cy), (cx, y1), (cx, y2)][side]
    r = rng.uniform(*_HARD["occlude_r"]) * (x2 - x1 + 1)
    ang = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(4, 8))))
    rad = r * rng.uniform(0.5, 1.0, len(ang))
    pts = [(cx + a * math.cos(t), cy + a * math.sin(t)) for a, t in zip(rad, ang)]
    colour = tuple(int(v) for v in np.clip(_SCENERY[rng.integers(len(_SCENERY))] + rng.normal(0, 20, 3), 0, 255))
    ImageDraw.Draw(img).polygon(pts, fill=colour)


def _render(cid: int, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """-> (H x W x 3 uint8 image, inclusive ROI x1, y1, x2, y2)."""
    w = int(round(math.exp(rng.uniform(*np.log(_HARD["size_px"])))))  # small images are commoner
    h = int(np.clip(round(w * rng.uniform(0.9, 1.1)), 26, 68))
    margin = rng.uniform(0.07, 0.2)
    k = min(w, h) * (1 - 2 * margin) / 100  # template px -> image px (the sign is ~100 template px)
    sw, sh = (max(8, round(_T * k * rng.uniform(*a))) for a in ((0.86, 1.06), (0.95, 1.04)))
    # shrink to twice the target first: rotating the 128 px template costs 10x more than this
    angle = float(np.clip(rng.normal(0, _HARD["rotate_sd"]), -14, 14))
    sign = _template(cid).resize((2 * sw, 2 * sh), Image.BILINEAR).rotate(angle, Image.BILINEAR)
    sign = np.asarray(sign.reduce(2), np.float32)
    fade = rng.uniform(0, _HARD["fade"])  # weathered paint drifts towards grey
    sign[..., :3] = sign[..., :3] * (1 - fade) + sign[..., :3].mean(axis=2, keepdims=True) * fade
    sign = Image.fromarray(sign.astype(np.uint8), "RGBA")

    img = _background(w, h, rng)
    x0 = round((w - sw) / 2 + rng.uniform(-0.5, 0.5) * margin * w)
    y0 = round((h - sh) / 2 + rng.uniform(-0.5, 0.5) * margin * h)
    if rng.random() < 0.4:  # the pole below the sign
        pw = max(1, round(sw * 0.07))
        ImageDraw.Draw(img).rectangle((x0 + sw // 2 - pw, y0 + sh // 2, x0 + sw // 2 + pw, h), fill=(130, 130, 125))
    img.paste(sign, (x0, y0), sign)
    bx1, by1, bx2, by2 = sign.getchannel("A").point(_OPAQUE).getbbox()
    jitter = rng.integers(-1, 2, 4)  # annotators are off by a pixel
    roi = (int(np.clip(x0 + bx1 + jitter[0], 0, w - 1)), int(np.clip(y0 + by1 + jitter[1], 0, h - 1)),
           int(np.clip(x0 + bx2 - 1 + jitter[2], 0, w - 1)), int(np.clip(y0 + by2 - 1 + jitter[3], 0, h - 1)))
    if rng.random() < _HARD["occlude_p"]:
        _occlude(img, roi, rng)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, _HARD["blur"]) * w / 40))

    a = np.asarray(img, np.float32) / 255
    a = a * math.exp(rng.uniform(*np.log(_HARD["gain"]))) * (1 + rng.normal(0, 0.07, 3))
    a = np.clip(a, 0, 1) ** math.exp(rng.normal(0, _HARD["gamma_sd"]))
    if rng.random() < _HARD["haze_p"]:  # haze / glare
        t = rng.uniform(0, 0.4)
        a = a * (1 - t) + t * rng.uniform(0.6, 1.0)
    a = a + rng.normal(0, rng.uniform(0, _HARD["noise"]), a.shape)
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8), roi


def _write_ppm(path: Path, x: np.ndarray) -> None:
    h, w, _ = x.shape
    path.write_bytes(b"P6\n%d %d\n255\n" % (w, h) + x.tobytes())


def _write_csv(path: Path, rows: list) -> None:
    lines = [";".join(CSV_COLUMNS)] + [";".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _image_rng(seed: int, split: int, cid: int, i: int) -> np.random.Generator:
    # one stream per image: its pixels never depend on how many others were drawn, or in what order
    return np.random.default_rng([seed, split, cid, i])


def _synthesize_into(tmp: Path, per_class: int, test_per_class: int, seed: int) -> None:
    for cid in range(NUM_CLASSES):
        d = tmp / "Final_Training" / "Images" / f"{cid:05d}"
        d.mkdir(parents=True)
        rows = []
        for i in range(per_class):
            x, roi = _render(cid, _image_rng(seed, 0, cid, i))
            name = f"{i // 30:05d}_{i % 30:05d}.ppm"  # GTSRB names: track_frame (30 per track)
            _write_ppm(d / name, x)
            rows.append((name, x.shape[1], x.shape[0], *roi, cid))
        _write_csv(d / f"GT-{cid:05d}.csv", rows)
    if test_per_class:
        d = tmp / "Final_Test" / "Images"
        d.mkdir(parents=True)
        # the real test set is one folder of mixed classes: shuffle which image gets which number
        items = [(cid, i) for cid in range(NUM_CLASSES) for i in range(test_per_class)]
        order = np.random.default_rng([seed, 2]).permutation(len(items))
        rows = []
        for n, j in enumerate(order):
            cid, i = items[j]
            x, roi = _render(cid, _image_rng(seed, 1, cid, i))
            _write_ppm(d / f"{n:05d}.ppm", x)
            rows.append((f"{n:05d}.ppm", x.shape[1], x.shape[0], *roi, cid))
        _write_csv(d / TEST_CSV, rows)


def synthesize_gtsrb(dest: Path, per_class: int, test_per_class: int, seed: int) -> dict:
    """Write a synthetic GTSRB tree at ``dest`` (same layout and CSVs as the real one).

    Deterministic: the same arguments give the same bytes. The tree is built beside ``dest`` and
    renamed into place, so ``dest`` is either absent, the old tree, or complete. An existing
    ``dest`` is replaced only if it is a synthetic tree (has the marker) or empty.
    """
    dest = Path(dest)
    if per_class < 1 or test_per_class < 0 or seed < 0:
        raise PassError(f"data: synthesize_gtsrb needs per_class >= 1, test_per_class >= 0, seed >= 0; "
                        f"got {per_class}, {test_per_class}, {seed}")
    marker = {"generator": "kiln synthetic GTSRB", "version": GENERATOR_VERSION, "per_class": per_class,
              "test_per_class": test_per_class, "seed": seed, "num_classes": NUM_CLASSES,
              "train_images": per_class * NUM_CLASSES, "test_images": test_per_class * NUM_CLASSES}
    return write_tree(dest, marker, lambda tmp: _synthesize_into(tmp, per_class, test_per_class, seed)
                      or marker["train_images"] + marker["test_images"])
