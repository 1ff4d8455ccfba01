"""Prompt adherence for the shapes domain, read from pixels: deterministic, no model, no GPU.

`classify` finds the background (the commonest palette colour on the image border), the one shape (the largest
connected region far from the background), its colour (nearest palette colour to the median of its inner
pixels), its type (best overlap with an ideal square / circle / upright triangle fitted to its bounding box) and
its position (bounding-box centre through `ldm_pipeline.shapes.domain.position_label`, the rule the generator uses).
Noise, blank or cluttered images give ``found=False``, which every score counts as wrong.

`parse_prompt` reads every caption phrasing `ldm_pipeline.shapes.domain` generates (and, loosely, other prompts that
name one colour, one shape and a "... background"); `score` compares the two, `evaluate` aggregates a Report with
held-in / held-out accuracy and confusion matrices, `score_recolour` checks an img2img colour edit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ldm_pipeline.errors import UserError
from ldm_pipeline.shapes.domain import CAPTION_TEMPLATES, COLOURS, HELD_OUT, POSITIONS, SHAPES, position_label

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)
MIN_BORDER_AGREEMENT = 0.6  # share of border pixels that must map to one palette colour for a "plain background"
FAR_FROM_BACKGROUND = 35.0  # RGB distance that marks a pixel as not background (closest palette pair: 71 apart)
MIN_AREA_FRACTION = 60 / 4096  # a shape covers at least this share of the image (a 16 px triangle: 128/4096)
MIN_COLOUR_AGREEMENT = 0.8  # share of the shape's inner pixels near its median colour: one colour, not noise
COLOUR_TOLERANCE = 50.0  # RGB distance from the median that counts as "near" (more for high-contrast edges)
MAX_CLUTTER = 0.5  # non-background pixels outside the shape, relative to its area, before it is "not one shape"
# (fill, skew) of each shape, see _shape_features; distances are scaled so a unit is a clear but small difference
# (ideal: 1, π/4, 1/2 and 0, 0, -0.566; a small triangle's widest row is its partly covered base, so it measures
# fuller: 0.52-0.67 after JPEG)
SHAPE_PROTOTYPES = {"square": (1.0, 0.0), "circle": (np.pi / 4, 0.0), "triangle": (0.56, -0.55)}
FILL_SCALE, SKEW_SCALE = 0.1, 0.25
MIN_SHAPE_SCORE = 0.35  # best similarity below this (scaled distance > 2) is an unrecognised blob ("unknown")
MAX_SIDE = 128  # larger images are box-filtered down first: the geometry needs no more and labelling stays fast
NO_SHAPE = "none"  # what confusion matrices record as the prediction when no shape was found


@dataclass
class Prediction:
    """What `classify` read from an image. Attributes are None when no shape was found (`reason` says why)."""

    found: bool
    background: str | None = None
    colour: str | None = None
    shape: str | None = None
    position: str | None = None
    cx: float | None = None  # bounding-box centre, px of the classified image
    cy: float | None = None
    size: int | None = None  # larger bounding-box side, px
    area: int = 0  # shape pixels
    confidence: float = 0.0  # similarity of the mask's geometry to the chosen shape, 0..1
    shape_scores: dict[str, float] = field(default_factory=dict)  # similarity to every shape's prototype
    colour_rgb: tuple[int, int, int] | None = None  # measured median colours
    background_rgb: tuple[int, int, int] | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each RGB row."""
    d = ((rgb[..., None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (min-label propagation with pointer jumping, no scipy)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new[~mask] = big
        new[mask] = new.ravel()[new[mask]]  # pointer jumping: a label is a pixel of the same region, take its label
        if np.array_equal(new, lab):
            break
        lab = new
    values, counts = np.unique(lab[mask], return_counts=True)
    return lab == values[counts.argmax()]


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def _shape_features(alpha: np.ndarray) -> tuple[float, float]:
    """(fill, skew) of a soft coverage mask.

    fill = area / (widest row × tallest column): square 1, circle π/4, triangle 1/2; measured on coverage sums,
    so anti-aliased rims count fractionally instead of flipping the bounding box by a pixel. skew = skewness of
    the mass along y: 0 for square and circle, -0.566 for an upright triangle (narrow top, wide bottom).
    """
    area = float(alpha.sum())
    rows = alpha.sum(1)
    fill = area / max(1e-6, float(rows.max()) * float(alpha.sum(0).max()))
    y = np.arange(len(rows), dtype=np.float64)
    mean = float((y * rows).sum()) / area
    var = float(((y - mean) ** 2 * rows).sum()) / area
    skew = float(((y - mean) ** 3 * rows).sum()) / area / max(1e-6, var) ** 1.5
    return fill, skew


def _shape_scores(fill: float, skew: float) -> dict[str, float]:
    """Similarity 0..1 of (fill, skew) to each shape's prototype, exp(-d²/4) of a scaled distance."""
    scores = {}
    for name, (f0, s0) in SHAPE_PROTOTYPES.items():
        d2 = ((fill - f0) / FILL_SCALE) ** 2 + ((skew - s0) / SKEW_SCALE) ** 2
        scores[name] = round(float(np.exp(-d2 / 4)), 4)
    return scores


def _not_found(reason: str, **kw: Any) -> Prediction:
    return Prediction(found=False, reason=reason, **kw)


def classify(image: Image.Image) -> Prediction:
    """Read background, shape colour, shape type and position from an image of the shapes domain."""
    img = image.convert("RGB")
    if max(img.size) > MAX_SIDE:
        scale = MAX_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    h, w, _ = arr.shape
    if h < 8 or w < 8:
        return _not_found(f"image too small ({w}x{h})")
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    border_idx = _nearest(border)
    counts = np.bincount(border_idx, minlength=len(_PALETTE))
    bg_i = int(counts.argmax())
    if counts[bg_i] < MIN_BORDER_AGREEMENT * len(border):
        return _not_found(f"no plain background (border agrees on one colour for {counts[bg_i] / len(border):.0%})")
    bg_rgb = np.median(border[border_idx == bg_i], axis=0)
    background = _PALETTE_NAMES[bg_i]
    measured_bg = tuple(int(round(v)) for v in bg_rgb)
    d_bg = np.sqrt(((arr - bg_rgb) ** 2).sum(-1))
    far = d_bg > FAR_FROM_BACKGROUND
    min_area = MIN_AREA_FRACTION * h * w
    if far.sum() < min_area:
        return _not_found("no shape: the image is (nearly) all background", background=background,
                          background_rgb=measured_bg)
    region = _largest_component(far)
    # inner pixels: two erosions skip the anti-aliased rim and JPEG's half-resolution chroma bleeding into it
    core = _erode(region)
    inner = _erode(core)
    core = inner if inner.sum() >= 20 else core if core.sum() >= 10 else region
    shape_rgb = np.median(arr[core], axis=0)
    # JPEG error near edges grows with the edge's contrast, so the tolerance does too
    tolerance = max(COLOUR_TOLERANCE, 0.35 * float(np.sqrt(((shape_rgb - bg_rgb) ** 2).sum())))
    agreement = float((np.sqrt(((arr[core] - shape_rgb) ** 2).sum(-1)) < tolerance).mean())
    if agreement < MIN_COLOUR_AGREEMENT:
        return _not_found(f"no single-colour shape (inner pixels agree for {agreement:.0%})", background=background,
                          background_rgb=measured_bg)
    # final mask: pixels nearer the shape's colour than the background's, i.e. anti-aliased edges split at 50%
    d_shape = np.sqrt(((arr - shape_rgb) ** 2).sum(-1))
    mask = _largest_component(d_shape < d_bg)
    area = int(mask.sum())
    clutter = int((far & ~_dilate(_dilate(mask))).sum())  # the anti-aliased rim is not clutter
    if area < min_area:
        return _not_found("no shape: the largest object is too small", background=background,
                          background_rgb=measured_bg)
    if clutter > MAX_CLUTTER * area:
        return _not_found(f"not one shape ({clutter} stray pixels beside a {area}-pixel object)",
                          background=background, background_rgb=measured_bg)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    # soft coverage: where each pixel lies between background (0) and shape colour (1), on the object only
    axis = shape_rgb - bg_rgb
    alpha = np.clip(((arr - bg_rgb) @ axis) / max(1e-6, float(axis @ axis)), 0.0, 1.0) * _dilate(_dilate(mask))
    scores = _shape_scores(*_shape_features(alpha))
    best = max(SHAPES, key=lambda s: scores[s])
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return Prediction(
        found=True, background=background, colour=_PALETTE_NAMES[int(_nearest(shape_rgb))],
        shape=best if scores[best] >= MIN_SHAPE_SCORE else "unknown", position=position_label(cx, cy, w, h),
        cx=cx, cy=cy, size=max(x1 - x0, y1 - y0), area=area, confidence=scores[best], shape_scores=scores,
        colour_rgb=tuple(int(round(v)) for v in shape_rgb), background_rgb=measured_bg)


# --- prompts


@dataclass(frozen=True)
class Expected:
    """The attributes a prompt asks for; None where the prompt does not say (e.g. no position)."""

    colour: str
    shape: str
    background: str | None = None
    position: str | None = None

    @property
    def held_out(self) -> bool:
        """Whether the (colour, shape) pair was never drawn for training."""
        return (self.colour, self.shape) in HELD_OUT


_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_POSITION_ALIASES = {"in the centre": "in the center", "in the middle": "in the center"}
_POSITION_RE = "|".join(re.escape(p) for p in (*POSITIONS, *_POSITION_ALIASES))


def _template_regex(template: str) -> re.Pattern[str]:
    fields = {
        "colour": f"(?P<colour>{_COLOUR_RE})", "background": f"(?P<background>{_COLOUR_RE})",
        "shape": f"(?P<shape>{_SHAPE_RE})", "a_colour": f"an? (?P<colour>{_COLOUR_RE})",
        "a_background": f"an? (?P<background>{_COLOUR_RE})",
    }
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(fields[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
    body = body.replace(r"\ ", r"\s+")
    return re.compile(rf"^{body}(?:\s*,\s*(?P<position>{_POSITION_RE}))?$")


_TEMPLATE_RES = [_template_regex(t) for t in CAPTION_TEMPLATES]


def _normalise(prompt: str) -> str:
    text = prompt.strip().lower().rstrip(".!").strip()
    return re.sub(r"\s+", " ", text.replace("centre", "center").replace("colored", "coloured"))


def _loose_parse(text: str) -> Expected | None:
    """Prompts in no known phrasing: one shape word, colour words, an optional "X background/backdrop"."""
    shapes = re.findall(rf"\b({_SHAPE_RE})s?\b", text)
    if len(set(shapes)) != 1:
        return None
    colours = [(m.group(1), m.start(), m.end()) for m in re.finditer(rf"\b({_COLOUR_RE})\b", text)]
    bg = next((c for c, _, end in colours if re.match(r"\s*(background|backdrop)\b", text[end:])), None)
    others = [c for c, _, _ in colours if c != bg] if bg else [c for c, _, _ in colours]
    if bg is None and len(others) == 2:  # "red circle on blue": the colour nearer the shape word is the shape's
        shape_at = text.find(shapes[0])
        colours.sort(key=lambda c: min(abs(c[1] - shape_at), abs(c[2] - shape_at)))
        others, bg = [colours[0][0]], colours[1][0]
    if len(set(others)) != 1:
        return None
    pos = re.search(rf"\b({_POSITION_RE})\b", text)
    position = _POSITION_ALIASES.get(pos.group(1), pos.group(1)) if pos else None
    return Expected(others[0], shapes[0], bg, position)


def parse_prompt(prompt: str) -> Expected:
    """The colour, shape, background and position a prompt asks for; every generated phrasing parses exactly."""
    text = _normalise(prompt)
    for pattern in _TEMPLATE_RES:
        m = pattern.match(text)
        if m:
            pos = m.group("position")
            return Expected(m.group("colour"), m.group("shape"), m.group("background"),
                            _POSITION_ALIASES.get(pos, pos) if pos else None)
    loose = _loose_parse(text)
    if loose is None:
        raise UserError(f"cannot read a shapes prompt from {prompt!r}: name one colour ({', '.join(COLOURS)}), "
                        f"one shape ({', '.join(SHAPES)}) and '<colour> background', e.g. "
                        "'a red circle on a blue background'")
    return loose


def _compare(expected: Expected, pred: Prediction) -> dict[str, Any]:
    found = pred.found
    result: dict[str, Any] = {
        "found": found,
        "colour": found and pred.colour == expected.colour,
        "shape": found and pred.shape == expected.shape,
        "background": None if expected.background is None else found and pred.background == expected.background,
        "position": None if expected.position is None else found and pred.position == expected.position,
        "held_out": expected.held_out,
    }
    result["all"] = bool(result["colour"] and result["shape"] and result["background"] is not False)
    return result


def score(prompt: str, image: Image.Image) -> dict[str, Any]:
    """Per-attribute correctness of `image` for `prompt`: found, colour, shape, background, position (None when
    the prompt names none), all (colour + shape + background, position aside) and held_out (of the prompt)."""
    return _compare(parse_prompt(prompt), classify(image))


def score_recolour(source_pred: Prediction, target_colour: str, result_image: Image.Image) -> dict[str, Any]:
    """An img2img recolour check: the result has `target_colour`, and the source's shape and background.

    Returns colour_ok, shape_ok, background_ok, all_ok (the three together), plus position_ok (kept the
    position label; not part of all_ok since strong edits may move the shape).
    """
    if target_colour not in COLOURS:
        raise UserError(f"unknown target colour {target_colour!r}; expected one of: {', '.join(COLOURS)}")
    if not source_pred.found:
        raise UserError(f"the source image has no shape to recolour ({source_pred.reason})")
    pred = classify(result_image)
    colour_ok = pred.found and pred.colour == target_colour
    shape_ok = pred.found and pred.shape == source_pred.shape
    background_ok = pred.found and pred.background == source_pred.background
    return {"colour_ok": colour_ok, "shape_ok": shape_ok, "background_ok": background_ok,
            "all_ok": colour_ok and shape_ok and background_ok,
            "position_ok": pred.found and pred.position == source_pred.position}


# --- aggregate report


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@dataclass
class Report:
    """Adherence over a set of (image, prompt) pairs. Accuracies are fractions (None when nothing counted)."""

    num_images: int = 0
    num_held_in: int = 0
    num_held_out: int = 0
    num_with_position: int = 0
    held_in_accuracy: float | None = None  # background + colour + shape all right, trained pairs
    held_out_accuracy: float | None = None  # the same on held-out pairs: compositional generalization
    accuracy: float | None = None  # the same over everything
    attribute_accuracy: dict[str, float | None] = field(default_factory=dict)  # colour, shape, background, position
    position_accuracy: float | None = None  # over prompts that name a position
    no_shape_rate: float | None = None  # images in which no shape was found
    combo_accuracy: dict[str, float] = field(default_factory=dict)  # "colour shape" -> all-right rate
    confusion: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # attr -> expected -> predicted

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        lines = [
            "| metric | value | n |", "|---|---|---|",
            f"| all right (background + colour + shape) | {_pct(self.accuracy)} | {self.num_images} |",
            f"| held-in pairs | {_pct(self.held_in_accuracy)} | {self.num_held_in} |",
            f"| held-out pairs | {_pct(self.held_out_accuracy)} | {self.num_held_out} |",
            f"| position (prompts naming one) | {_pct(self.position_accuracy)} | {self.num_with_position} |",
            f"| no shape found | {_pct(self.no_shape_rate)} | {self.num_images} |",
        ]
        lines += ["", "| attribute | accuracy |", "|---|---|"]
        lines += [f"| {k} | {_pct(v)} |" for k, v in self.attribute_accuracy.items()]
        if self.combo_accuracy:
            lines += ["", "| colour shape | all right | held out |", "|---|---|---|"]
            for combo, acc in self.combo_accuracy.items():
                held = "yes" if tuple(combo.split(" ")) in HELD_OUT else ""
                lines.append(f"| {combo} | {_pct(acc)} | {held} |")
        for attr, matrix in self.confusion.items():
            if not matrix:
                continue
            predicted = sorted({p for row in matrix.values() for p in row})
            lines += ["", f"**{attr}** (rows: expected, columns: predicted)", "",
                      "| expected | " + " | ".join(predicted) + " |", "|---" * (len(predicted) + 1) + "|"]
            for exp, row in matrix.items():
                lines.append(f"| {exp} | " + " | ".join(str(row.get(p, 0)) for p in predicted) + " |")
        return "\n".join(lines) + "\n"


def evaluate(images_with_prompts: Iterable[tuple[Image.Image, str]]) -> Report:
    """Score (image, prompt) pairs ((prompt, image) is read too) and aggregate them into a Report."""
    attrs = ("colour", "shape", "background", "position")
    hits = {a: 0 for a in attrs}
    totals = {a: 0 for a in attrs}
    confusion: dict[str, dict[str, dict[str, int]]] = {a: {} for a in attrs}
    combos: dict[str, list[int]] = {}
    n = n_in = n_out = ok = ok_in = ok_out = missing = 0
    for pair in images_with_prompts:
        image, prompt = pair
        if isinstance(image, str):
            image, prompt = prompt, image
        expected = parse_prompt(prompt)
        pred = classify(image)
        result = _compare(expected, pred)
        n += 1
        missing += not pred.found
        ok += result["all"]
        if expected.held_out:
            n_out, ok_out = n_out + 1, ok_out + result["all"]
        else:
            n_in, ok_in = n_in + 1, ok_in + result["all"]
        combo = combos.setdefault(f"{expected.colour} {expected.shape}", [0, 0])
        combo[0] += result["all"]
        combo[1] += 1
        for a in attrs:
            want = getattr(expected, a)
            if want is None:
                continue
            totals[a] += 1
            hits[a] += bool(result[a])
            got = getattr(pred, a) if pred.found else NO_SHAPE
            row = confusion[a].setdefault(want, {})
            row[got] = row.get(got, 0) + 1
    return Report(
        num_images=n, num_held_in=n_in, num_held_out=n_out, num_with_position=totals["position"],
        held_in_accuracy=_rate(ok_in, n_in), held_out_accuracy=_rate(ok_out, n_out), accuracy=_rate(ok, n),
        attribute_accuracy={a: _rate(hits[a], totals[a]) for a in attrs},
        position_accuracy=_rate(hits["position"], totals["position"]), no_shape_rate=_rate(missing, n),
        combo_accuracy={k: v[0] / v[1] for k, v in sorted(combos.items())},
        confusion={a: {k: dict(sorted(v.items())) for k, v in sorted(confusion[a].items())} for a in attrs},
    )
