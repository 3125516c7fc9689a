"""Seeded procedural images with templated questions and short answers (the adapter's training data).

Five tasks: "colour" (the colour of the one shape), "shape" (its kind), "count" (how many shapes,
1-5), "position" (left/right/top/bottom of the picture) and "read" (a word or number from the fixed
vocabulary WORDS, rendered with Pillow's bundled FreeType font). Backgrounds are random low-saturation
colours with pixel noise; sizes, positions, rotations and colour shades are jittered. Canvases are
256-512 px square (the API's 512x512 inputs are in range): preprocessing resizes them, so the
encoder sees the same thing at every source size.

Every example is a pure function of (split, index): `seed_of` maps the "train" split to even seeds
and "heldout" to odd ones, so the two never share a seed, and a rerun gives the same pixels.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 35), "green": (40, 165, 60),
    "blue": (40, 80, 220), "purple": (135, 50, 180), "pink": (250, 125, 195), "brown": (125, 75, 35),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = ("1", "2", "3", "4", "5")
WORDS = ("cat", "hat", "car", "dog", "sun", "tree", "fish", "bird", "book", "cup", "box", "key",
         "map", "pen", "egg", "bus", "ship", "moon", "rain", "fire", "door", "ball", "milk", "king",
         "12", "17", "25", "42", "56", "73", "88", "90")
TASKS = ("colour", "shape", "count", "position", "read")
# The answer vocabulary of each task: aux classification targets (train.py) and bench labels.
LABELS: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS,
                                      "position": POSITIONS, "read": WORDS}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What color is the shape in the image?",
               "Which colour is the object?", "What is the colour of the shape?"),
    "shape": ("What shape is this?", "What shape is in the image?", "Which shape do you see?",
              "Name the shape in the picture."),
    "count": ("How many shapes are there?", "How many shapes are in the image?",
              "Count the shapes in the picture.", "How many objects do you see?"),
    "position": ("Where is the shape?", "Where is the shape in the image: left, right, top or bottom?",
                 "Which side of the picture is the shape on?", "Where is the object placed?"),
    "read": ("What word is written in the image?", "What does the text say?", "Read the text in the image.",
             "What is written here?"),
}
# Task sampling weights for training: the harder tasks get more examples (the warm-up classifiers
# also learn colour from shape and position scenes, whose labels include it).
TASK_WEIGHTS = {"colour": 0.1, "shape": 0.25, "count": 0.3, "position": 0.1, "read": 0.25}
SPLITS = ("train", "heldout")
MIN_SIDE, MAX_SIDE = 256, 512


@dataclass
class Example:
    image: Image.Image
    task: str
    question: str
    answer: str
    # Scene labels by task name, indices into LABELS[task] (only those the scene defines).
    labels: dict[str, int] = field(default_factory=dict)
    seed: int = 0


def seed_of(split: str, index: int) -> int:
    """Train examples have even seeds, held-out ones odd: disjoint by construction."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
    if index < 0:
        raise ValueError("example index must be >= 0")
    return 2 * index + SPLITS.index(split)


def example(split: str, index: int, task: str | None = None, side: int | None = None) -> Example:
    """Example `index` of `split`; its task is drawn from TASK_WEIGHTS unless given; its canvas side
    is drawn from MIN_SIDE..MAX_SIDE unless given."""
    seed = seed_of(split, index)
    rng = random.Random(seed)
    if task is None:
        task = rng.choices(TASKS, weights=[TASK_WEIGHTS[t] for t in TASKS])[0]
    elif task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {TASKS})")
    side = side or rng.randrange(MIN_SIDE, MAX_SIDE + 1, 32)
    img, labels = _SCENES[task](rng, side)
    img = _add_noise(img, rng)
    answer = LABELS[task][labels[task]]
    return Example(img, task, rng.choice(QUESTIONS[task]), answer, labels, seed)


def examples(split: str, count: int, start: int = 0, task: str | None = None) -> list[Example]:
    return [example(split, i, task) for i in range(start, start + count)]


# ---------------------------------------------------------------------------------------------------
# Scenes


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation colour (light or dark): every shape colour stands out from it by hue."""
    level = rng.choice((rng.randint(25, 90), rng.randint(165, 245)))
    return tuple(max(0, min(255, level + rng.randint(-18, 18))) for _ in range(3))


def _shade(rng: random.Random, name: str) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-22, 22))) for c in COLOURS[name])


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
        pts = [(x * r, y * r) for x, y in pts]
    elif kind == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif kind == "hexagon":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    elif kind == "star":
        pts = [((r if k % 2 == 0 else 0.42 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else 0.42 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif kind == "cross":
        w = 0.34 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
               (-r, -w), (-w, -w)]
    else:
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=fill)


def _one_shape(rng: random.Random, side: int, cx: float, cy: float, r: float) -> tuple[Image.Image, dict]:
    img = Image.new("RGB", (side, side), _background(rng))
    colour, kind = rng.randrange(len(COLOURS)), rng.randrange(len(SHAPES))
    angle = math.radians(rng.uniform(-12, 12))
    _draw_shape(ImageDraw.Draw(img), SHAPES[kind], cx, cy, r, angle, _shade(rng, tuple(COLOURS)[colour]))
    return img, {"colour": colour, "shape": kind, "count": 0}


def _single_scene(rng: random.Random, side: int) -> tuple[Image.Image, dict]:
    r = rng.uniform(0.12, 0.3) * side
    return _one_shape(rng, side, rng.uniform(r, side - r), rng.uniform(r, side - r), r)


def _position_scene(rng: random.Random, side: int) -> tuple[Image.Image, dict]:
    r = rng.uniform(0.08, 0.15) * side
    where = rng.randrange(len(POSITIONS))
    near = rng.uniform(r, 0.3 * side)  # distance of the centre from its edge
    across = rng.uniform(0.35, 0.65) * side
    cx, cy = {"left": (near, across), "right": (side - near, across), "top": (across, near),
              "bottom": (across, side - near)}[POSITIONS[where]]
    img, labels = _one_shape(rng, side, cx, cy, r)
    return img, {**labels, "position": where}


def _count_scene(rng: random.Random, side: int) -> tuple[Image.Image, dict]:
    n = rng.randint(1, 5)
    img = Image.new("RGB", (side, side), _background(rng))
    draw = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < n:  # rejection sampling: shapes never touch (terminates: 5 small discs fit easily)
        r = rng.uniform(0.06, 0.11) * side
        cx, cy = rng.uniform(r, side - r), rng.uniform(r, side - r)
        if all(math.hypot(cx - x, cy - y) > r + q + 0.03 * side for x, y, q in placed):
            placed.append((cx, cy, r))
    for cx, cy, r in placed:
        kind = rng.choice(SHAPES)
        _draw_shape(draw, kind, cx, cy, r, math.radians(rng.uniform(-12, 12)), _shade(rng, rng.choice(tuple(COLOURS))))
    return img, {"count": n - 1}


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _read_scene(rng: random.Random, side: int) -> tuple[Image.Image, dict]:
    bg = _background(rng)
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    word = rng.randrange(len(WORDS))
    text = WORDS[word]
    # Font size so that the word spans 40-80% of the canvas width.
    probe = _font(100).getbbox(text)
    size = max(12, int(100 * rng.uniform(0.4, 0.8) * side / max(1, probe[2] - probe[0])))
    size = min(size, int(0.45 * side))
    font = _font(size)
    x0, y0, x1, y1 = font.getbbox(text)
    x = rng.uniform(0, max(0.0, side - (x1 - x0))) - x0
    y = rng.uniform(0, max(0.0, side - (y1 - y0))) - y0
    dark_bg = sum(bg) < 3 * 128
    ink = tuple(rng.randint(200, 255) if dark_bg else rng.randint(0, 60) for _ in range(3))
    if rng.random() < 0.5:  # sometimes coloured ink
        ink = _shade(rng, rng.choice(("red", "blue", "green", "purple", "brown") if not dark_bg
                                     else ("yellow", "orange", "pink", "green")))
    draw.text((x, y), text, font=font, fill=ink)
    return img, {"read": word}


def _add_noise(img: Image.Image, rng: random.Random) -> Image.Image:
    sigma = rng.uniform(0.0, 14.0)
    if sigma < 1.0:
        return img
    noise = np.random.default_rng(rng.getrandbits(32)).standard_normal((img.height, img.width, 1), np.float32)
    arr = np.asarray(img, dtype=np.float32) + sigma * noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


_SCENES = {"colour": _single_scene, "shape": _single_scene, "count": _count_scene,
           "position": _position_scene, "read": _read_scene}


# ---------------------------------------------------------------------------------------------------
# Scoring

_NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
_SYNONYMS = {"color": "colour", "grey": "gray", "violet": "purple"}


def normalize(text: str) -> list[str]:
    """Lower-cased words (number words as digits), punctuation dropped."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [_NUMBER_WORDS.get(w, _SYNONYMS.get(w, w)) for w in words]


def matches(generated: str, expected: str) -> bool:
    """True when the expected label appears as a whole word (or word sequence) of the answer."""
    got, want = normalize(generated), normalize(expected)
    return bool(want) and any(got[i: i + len(want)] == want for i in range(len(got) - len(want) + 1))
