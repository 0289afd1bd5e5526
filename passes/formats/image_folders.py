"""Dataset format ``image_folders``: ``<root>/<class>/*.png|jpg|jpeg|ppm|bmp`` (or
``<root>/{train,val,test}/<class>/...``), the layout most teams' own images come in (Edge
Impulse's and ST's model zoo's image folders, torchvision's ImageFolder).

Each image is turned upright by its EXIF orientation, 16-bit images are scaled to 8 bits (the
high byte), then it is converted to RGB or grayscale (``dataset.color``) and resized bilinear to
``dataset.image_size``: uint8 N x H x W x C. The folder rules (classes, splits, what is skipped
or refused) are passes/formats/support/folders.py's. ``synthesize`` writes simple shapes in class
colours, as PNG (some JPEG and BMP) files in the same layout.

A regressor (the manifest's ``regression`` section) reads its numeric labels from
``<root>/labels.csv`` instead of class folders: a header ``file,value``, then one row per image,
its path relative to ``<root>`` and its value. A row naming no file under ``<root>``, or a value
that is not a number, is a PassError naming the line; an image that cannot be read is reported
and skipped, as in class folders. Every image is its own group (``dataset.split.group_by``).
"""

from __future__ import annotations

import io
import math
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from kiln.errors import ManifestError, PassError
from passes.formats import Loaded
from passes.formats.support import folders
from passes.formats.support.folders import Unreadable

EXTS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")
WHAT = "images"
GENERATOR_VERSION = 1  # bump whenever the drawing changes, so cached trees are regenerated
DECODER_VERSION = 1  # bump whenever decoding changes, so the data stage's decode cache is not used
SIDE = 32  # synthetic images are drawn at 4x this and downscaled (anti-aliased edges)

# synthetic classes: shape k in colour k (k < 10); beyond ten, every shape in every colour
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star", "hourglass", "dots")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "magenta": (200, 50, 200), "cyan": (40, 200, 210), "orange": (240, 130, 30), "white": (235, 235, 235),
           "purple": (160, 80, 230), "brown": (180, 120, 60)}


LABELS_CSV = "labels.csv"  # a regressor's labels: file,value


def locate(ds, layout) -> tuple[Path, bool]:
    if ds._numeric:
        path = folders.resolve(ds.path)
        if not (path / LABELS_CSV).is_file():
            raise ManifestError(f"field 'dataset.path': {path} holds no {LABELS_CSV}: a regressor's images are listed "
                                "there with their values (a header file,value; paths relative to dataset.path)")
        return path, False
    return folders.locate(ds, layout, EXTS, WHAT)


def infer(ds, root: Path) -> dict:
    if ds._numeric:  # no classes: the values are in labels.csv
        return {}
    return folders.infer(ds, root, EXTS, WHAT, synthetic_names)


def load(ds, root: Path) -> Loaded:
    mode = "RGB" if ds.color == "rgb" else "L"
    h, w = (int(v) for v in ds.image_size)

    def read(path: Path) -> np.ndarray:
        return read_image(path, mode, (h, w))

    settings = {"mode": mode, "size": [h, w], "decoder": DECODER_VERSION}
    if ds._numeric:
        return _load_values(ds, Path(root), read, settings)
    return folders.load_tree(ds, root, EXTS, read, np.uint8, "image_folders", settings=settings)


def _load_values(ds, root: Path, read, settings: dict) -> Loaded:
    """A regressor's images, listed in ``<root>/labels.csv`` (file,value) -> Loaded with float64
    values; every image its own group."""
    from passes.formats.support.csvio import UnreadableCsv, read_table

    path = root / LABELS_CSV
    try:
        table = read_table(path)
    except UnreadableCsv as e:
        raise PassError(f"data: {path}: cannot read it: {str(e).removeprefix('data: ')}") from e
    for column in ("file", "value"):
        if column not in table.header:
            raise PassError(f"data: {path}:1: missing column {column!r} (a header file,value; got "
                            f"{','.join(table.header)!r})")
    values = table.numbers(["value"])[:, 0]
    files, top = [], root.resolve()
    for i, (line, name) in enumerate(zip(table.lines, table.strings("file"))):
        p = (root / name.strip()).resolve()
        if not p.is_file() or top not in p.parents:
            raise PassError(f"data: {path}:{line}: {name.strip()!r} is no file under {root}")
        files.append((p, i))
    if not files:
        raise PassError(f"data: {path} lists no images")
    skipped: list[str] = []
    kept: list[Path] = []
    x, idx = folders.load_files(files, read, tuple(ds.raw_shape()), np.uint8, skipped, kept,
                                {"format": "image_folders", **settings})
    if skipped:
        folders.log.warning("data: skipped %d image(s) listed in %s, first: %s", len(skipped), path,
                            "; ".join(skipped[:folders.EXAMPLES]))
    n = len(idx)
    report = {"source": str(root), "samples": n, "images": n, "skipped": len(skipped),
              "skipped_examples": skipped[:folders.EXAMPLES], "labels_csv": str(path)}
    source = {"format": "image_folders", "num_classes": 1, "channels": ds.channels, "classes": None,
              "target_column": "value", "synthetic": None, "test_source": "split of labels.csv"}
    sources = {"train": [p.relative_to(top).as_posix() for p in kept]}
    return Loaded((x, values[idx].astype(np.float64)), None, report, source, None, sources, "file")


def read_image(path: Path, mode: str, size_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, C) uint8: decoded by ``open_image`` (displayed orientation, 16-bit scaled to 8),
    resized bilinear. Raises Unreadable."""
    im = open_image(path, mode)
    if im.size != (size_hw[1], size_hw[0]):
        im = im.resize((size_hw[1], size_hw[0]), Image.BILINEAR)
    a = np.asarray(im, np.uint8)
    return a[..., None] if a.ndim == 2 else a


# Pillow's modes for one 16-bit channel (PNG gives I;16, a 16-bit PGM/PPM gives I)
_WIDE = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def open_image(path: Path, mode: str) -> Image.Image:
    """The image at ``path`` as every viewer shows it, in ``mode`` (RGB or L), decoded (so a
    truncated file fails here). Raises Unreadable with the reason.

    * The EXIF Orientation tag is applied (``ImageOps.exif_transpose``): a phone photo stored
      in sensor orientation comes out upright, as displayed.
    * A 16-bit grayscale image (mode I;16 / I) keeps its high byte (value >> 8): Pillow's own
      conversion to L clips every value above 255 to white. Pillow already reads 16-bit RGB(A)
      PNGs by their high byte, so both kinds map the same way; the full 16-bit range maps to
      0..255 whatever the image holds (no per-image stretch that would change its brightness).
      Values outside 0..65535 (a 32-bit image) are refused.
    """
    try:
        with Image.open(path) as im:
            im.load()  # forces the decode, so a truncated file fails here
            im = ImageOps.exif_transpose(im)
            if im.mode in _WIDE:
                a = np.asarray(im)
                if a.size and (int(a.min()) < 0 or int(a.max()) > 0xFFFF):
                    raise Unreadable(f"{im.mode} pixels span {int(a.min())}..{int(a.max())}, expected 8- or "
                                     "16-bit values")
                im = Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), "L")
            return im.convert(mode)
    except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError) as e:
        # PIL's UnidentifiedImageError is an OSError; struct.error: a malformed EXIF block
        raise Unreadable(f"{type(e).__name__}: {e}") from e


# --- the synthetic generator ------------------------------------------------------------------


def synthetic_names(classes: int) -> list[str]:
    """The synthetic classes' names: shape names up to ten, else colour_shape."""
    if classes <= len(SHAPES):
        return list(SHAPES[:classes])
    return [f"{c}_{s}" for s, c in (_class_style(k) for k in range(classes))]


def _class_style(k: int) -> tuple[str, str]:
    # (shape, colour): distinct pairs for all 100 classes (for a shape, k // 10 picks the colour)
    s = k % len(SHAPES)
    return SHAPES[s], list(COLOURS)[(s + k // len(SHAPES)) % len(COLOURS)]


def _polygon(n: int, r: float, cx: float, cy: float, angle: float, inner: float | None = None):
    pts = []
    for i in range(n * (2 if inner else 1)):
        rr = (inner if inner and i % 2 else 1.0) * r
        a = angle + math.pi * 2 * i / (n * (2 if inner else 1))
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    """One shape of radius ``r`` about (cx, cy), rotated by ``angle`` (radians)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(r * 0.35)))
    elif shape == "square":
        draw.polygon(_polygon(4, r * 1.2, cx, cy, angle + math.pi / 4), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r * 1.2), (cx + r * 0.7, cy), (cx, cy + r * 1.2), (cx - r * 0.7, cy)], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(3, r * 1.2, cx, cy, angle - math.pi / 2), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(5, r * 1.2, cx, cy, angle - math.pi / 2, inner=0.45), fill=fill)
    elif shape in ("cross", "bar"):
        arms = (angle, angle + math.pi / 2) if shape == "cross" else (angle,)
        for a in arms:
            dx, dy = math.cos(a) * r * 1.1, math.sin(a) * r * 1.1
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=fill, width=max(1, round(r * 0.4)))
    elif shape == "hourglass":
        draw.polygon([(cx - r, cy - r), (cx + r, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # dots: three in a row
        for i in (-1, 0, 1):
            px, py = cx + i * r * 0.75 * math.cos(angle), cy + i * r * 0.75 * math.sin(angle)
            draw.ellipse((px - r * 0.3, py - r * 0.3, px + r * 0.3, py + r * 0.3), fill=fill)


def draw_sample(k: int, rng: np.random.Generator) -> Image.Image:
    """One SIDE x SIDE RGB image of class ``k``: its shape in its colour (jittered), at a random
    position, scale and rotation, on a random dark background with noise."""
    shape, colour = _class_style(k)
    big = SIDE * 4
    # a dark background, slightly tinted: every class colour stands out from it, in grey too
    bg = tuple(int(v) for v in np.clip(rng.integers(20, 70) + rng.integers(-15, 16, 3), 0, 255))
    im = Image.new("RGB", (big, big), bg)
    fill = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in COLOURS[colour])
    r = big * rng.uniform(0.24, 0.32)
    cx, cy = (big / 2 + rng.uniform(-0.12, 0.12, 2) * big)
    _draw_shape(ImageDraw.Draw(im), shape, cx, cy, r, rng.uniform(-0.4, 0.4), fill)
    small = np.asarray(im.resize((SIDE, SIDE), Image.LANCZOS), np.float64)
    small = small + rng.normal(0, 6, small.shape)
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8))


def _encode(im: Image.Image, ext: str) -> bytes:
    # bytes, not a direct save: the same image always gives the same bytes (no metadata written)
    buf = io.BytesIO()
    im.save(buf, format={".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP"}[ext],
            **({"quality": 95} if ext == ".jpg" else {}))
    return buf.getvalue()


def _ext(i: int) -> str:
    # mostly PNG; a few JPEG and BMP files, as a team's folders have
    return ".jpg" if i % 7 == 3 else ".bmp" if i % 11 == 5 else ".png"


def synthesize(ds, dest: Path) -> dict:
    """Write ``<dest>/train/<class>/*.png`` and ``<dest>/test/<class>/*.png`` (some .jpg/.bmp):
    ``synthetic.per_class`` / ``test_per_class`` images per class. Deterministic: the same
    settings give byte-identical files; train and test draw from their own streams."""
    syn = ds.synthetic
    names = synthetic_names(syn.classes)
    marker = {"generator": "kiln synthetic image_folders", "version": GENERATOR_VERSION, "classes": names,
              "per_class": syn.per_class, "test_per_class": syn.test_per_class, "seed": syn.seed, "side": SIDE}

    def write(d: Path, k: int, name: str, i: int, rng) -> None:
        ext = _ext(i)
        (d / f"{name}_{i:04d}{ext}").write_bytes(_encode(draw_sample(k, rng), ext))

    return folders.write_class_tree(dest, marker, names, syn, write)
