"""Generate the synthetic sample catalog in this folder (deterministic: same seed, same bytes).

    python sample_data/generate.py            # rewrite items.csv, interactions.csv, attributes.csv, images/
    python sample_data/generate.py --out DIR  # write somewhere else

Planted structure (see README.md in this folder):

- category (coarse) is in BOTH modalities: the shape drawn in the image and the word in the title;
- colour and pattern are in the image ONLY; material and brand are in the text ONLY;
- each user likes a few colours, a pattern, a few materials and a brand (fine attributes), and a
  little of one category; interactions are sampled from those preferences plus item popularity
  (log-normal) and Gumbel noise, with timestamps and 1-5 ratings.

Needs numpy and Pillow only.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SEED = 20261128
N_ITEMS = 400
N_USERS = 600
SIZE = 64  # image side in pixels
SCALE = 4  # draw at SIZE * SCALE, then downsample (anti-aliasing)
START = 1704067200  # 2024-01-01T00:00:00Z

# coarse attribute: category -> (shape drawn, words in the title)
CATEGORIES = {
    "clock": ("circle", "wall clock"),
    "cushion": ("square", "throw cushion"),
    "lamp": ("triangle", "table lamp"),
    "kite": ("diamond", "kite"),
    "coaster": ("hexagon", "coaster set"),
    "ornament": ("star", "hanging ornament"),
}
# fine, image only
COLOURS = {"red": (200, 40, 40), "orange": (235, 130, 30), "yellow": (230, 200, 40), "green": (60, 150, 60),
           "teal": (30, 140, 140), "blue": (40, 80, 200), "purple": (120, 60, 170), "pink": (225, 110, 170)}
PATTERNS = ("solid", "stripes", "dots", "checks")
# fine, text only
MATERIALS = ("cotton", "oak", "ceramic", "steel", "wool", "bamboo", "glass", "leather")
BRANDS = ("Nordhaven", "Lumio", "Bramblewood", "Solvik", "Fennick", "Ardent & Co")

ADJECTIVES = ("sturdy", "lightweight", "elegant", "compact", "handmade", "minimalist", "classic", "cosy")
ROOMS = ("the living room", "a child's bedroom", "a small flat", "the kitchen", "a reading nook", "a home office")
BENEFITS = ("is easy to clean", "makes a thoughtful gift", "arrives ready to use", "is built to last for years",
            "adds a calm touch to any shelf", "packs flat for moving")
TEMPLATES = (
    "A {adj} {cat} made from {material}. {brand} designs it for {room}, and it {benefit}.",
    "This {cat} from {brand} is crafted in {material} and {benefit}. A good fit for {room}.",
    "{brand} presents a {adj} {material} {cat}. It {benefit} and suits {room}.",
    "Made of {material}, this {adj} {cat} by {brand} {benefit}. Try it in {room}.",
)


def make_items(rng: np.random.Generator) -> list[dict]:
    cats = list(CATEGORIES)
    items = []
    for j in range(N_ITEMS):
        item = {
            "item_id": f"P{j + 1:04d}",
            "category": cats[rng.integers(len(cats))],
            "colour": list(COLOURS)[rng.integers(len(COLOURS))],
            "pattern": PATTERNS[rng.integers(len(PATTERNS))],
            "material": MATERIALS[rng.integers(len(MATERIALS))],
            "brand": BRANDS[rng.integers(len(BRANDS))],
            "popularity": float(rng.lognormal(0.0, 0.7)),
        }
        cat_words = CATEGORIES[item["category"]][1]
        item["title"] = f"{item['brand']} {item['material'].capitalize()} {cat_words.title()}"
        item["description"] = TEMPLATES[rng.integers(len(TEMPLATES))].format(
            adj=ADJECTIVES[rng.integers(len(ADJECTIVES))], cat=cat_words, material=item["material"],
            brand=item["brand"], room=ROOMS[rng.integers(len(ROOMS))], benefit=BENEFITS[rng.integers(len(BENEFITS))])
        item["price"] = f"{rng.integers(5, 80)}.{rng.choice([0, 49, 99]):02d}"
        item["image"] = f"images/{item['item_id']}.jpg"
        items.append(item)
    return items


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}
    if shape == "star":
        pts = [(r if k % 2 == 0 else 0.45 * r, angle + math.pi * k / 5) for k in range(10)]
    else:
        n = corners[shape]
        offset = math.pi / 4 if shape == "square" else 0.0
        pts = [(r, angle + offset + 2 * math.pi * k / n) for k in range(n)]
        if shape == "diamond":  # a tall rhombus
            pts = [(rad * (1.0 if k % 2 == 0 else 0.6), a) for k, (rad, a) in enumerate(pts)]
    return [(cx + rad * math.sin(a), cy - rad * math.cos(a)) for rad, a in pts]


def draw_item(item: dict, rng: np.random.Generator) -> bytes:
    big = SIZE * SCALE
    shade = np.array(COLOURS[item["colour"]])
    dark = tuple(int(v) for v in shade * 0.55)
    light = tuple(int(v + (255 - v) * 0.6) for v in shade)
    fill = Image.new("RGB", (big, big), tuple(int(v) for v in shade))
    pen = ImageDraw.Draw(fill)
    step = big // 8
    if item["pattern"] == "stripes":
        for x in range(-big, big, step):
            pen.polygon([(x, 0), (x + step // 2, 0), (x + step // 2 + big, big), (x + big, big)], fill=dark)
    elif item["pattern"] == "dots":
        for y in range(step // 2, big, step):
            for x in range(step // 2, big, step):
                pen.ellipse([x - step // 4, y - step // 4, x + step // 4, y + step // 4], fill=light)
    elif item["pattern"] == "checks":
        for y in range(0, big, step):
            for x in range(0, big, step):
                if (x // step + y // step) % 2:
                    pen.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    mask = Image.new("L", (big, big), 0)
    shape = CATEGORIES[item["category"]][0]
    cx, cy = big / 2 + rng.uniform(-6, 6) * SCALE, big / 2 + rng.uniform(-6, 6) * SCALE
    r = big * rng.uniform(0.32, 0.42)
    angle = rng.uniform(-0.25, 0.25)
    if shape == "circle":
        ImageDraw.Draw(mask).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        ImageDraw.Draw(mask).polygon(_shape_points(shape, cx, cy, r, angle), fill=255)
    grey = int(rng.integers(225, 246))
    background = Image.new("RGB", (big, big), (grey, grey, grey - 6))
    img = Image.composite(fill, background, mask).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    noise = rng.normal(0.0, 3.0, size=(SIZE, SIZE, 3))
    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_interactions(items: list[dict], rng: np.random.Generator) -> list[tuple[str, str, int, int]]:
    """(user_id, item_id, timestamp, rating) rows, sorted by user then time."""
    cats = list(CATEGORIES)
    attr = {
        "colour": np.array([list(COLOURS).index(it["colour"]) for it in items]),
        "pattern": np.array([PATTERNS.index(it["pattern"]) for it in items]),
        "material": np.array([MATERIALS.index(it["material"]) for it in items]),
        "brand": np.array([BRANDS.index(it["brand"]) for it in items]),
        "category": np.array([cats.index(it["category"]) for it in items]),
    }
    log_pop = np.log([it["popularity"] for it in items])
    rows = []
    for u in range(N_USERS):
        likes = {  # attribute -> (liked values, weight): fine attributes drive the choice
            "colour": (rng.choice(len(COLOURS), size=2, replace=False), 2.5),
            "pattern": (rng.choice(len(PATTERNS), size=1, replace=False), 2.0),
            "material": (rng.choice(len(MATERIALS), size=2, replace=False), 2.5),
            "brand": (rng.choice(len(BRANDS), size=1, replace=False), 2.0),
            "category": (rng.choice(len(cats), size=1, replace=False), 0.5),
        }
        match = np.zeros(len(items))
        for name, (values, weight) in likes.items():
            match += weight * np.isin(attr[name], values)
        score = match + 0.8 * log_pop + rng.gumbel(size=len(items))  # Gumbel top-k = sampling w/o replacement
        n = int(np.clip(6 + rng.geometric(1 / 12), 6, 60))
        chosen = np.argsort(-score, kind="stable")[:n]
        t = START + int(rng.integers(0, 270 * 86400))
        for j in rng.permutation(chosen):
            t += int(rng.exponential(3 * 86400)) + 60
            rating = int(np.clip(round(1.6 + 0.35 * match[j] + rng.normal(0, 0.8)), 1, 5))
            rows.append((f"U{u + 1:04d}", items[j]["item_id"], t, rating))
    return rows


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def generate(out: Path) -> None:
    rng = np.random.default_rng(SEED)
    items = make_items(rng)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for item in items:
        (out / item["image"]).write_bytes(draw_item(item, rng))
    inter = make_interactions(items, rng)
    cols = ["item_id", "title", "description", "image", "price"]
    (out / "items.csv").write_bytes(_csv_bytes(cols, [[it[c] for c in cols] for it in items]))
    truth = ["item_id", "category", "colour", "pattern", "material", "brand"]
    (out / "attributes.csv").write_bytes(_csv_bytes(truth, [[it[c] for c in truth] for it in items]))
    (out / "interactions.csv").write_bytes(_csv_bytes(["user_id", "item_id", "timestamp", "rating"],
                                                      [list(r) for r in inter]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
