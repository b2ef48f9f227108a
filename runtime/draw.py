"""The pictures of ``convspec show``, drawn with Pillow from plain numbers
(metrics records, weight arrays, image crops and probabilities, the checked
graph); :mod:`runtime.show` reads the run and computes those numbers.

    canvas = Canvas(640, 400)
    chart = Chart(canvas, (60, 30, 620, 360), x_range=(0, 10), y_range=(0, 100),
                  x_label="epoch", y_label="error (%)")
    chart.axes()
    chart.series([(1, 80), (2, 60)], colour=PALETTE[0])
    canvas.image().save("chart.png")

Only Pillow and its built-in font (``ImageFont.load_default(size=...)``,
Pillow 10.1 or newer), so a picture looks the same on every machine.  That
font has no glyphs for arrows, dashes or the multiplication sign: labels
use ASCII ("lr x0.1", "48x55x55").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from convspec.layers import Layer, fmt_shape, numel

# Colour-blind-safe (Okabe-Ito), in the order runs and devices take them.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
INK = "#222222"
MUTED = "#666666"
GRID = "#E4E4E4"
BACKGROUND = "white"

# Lines and text are drawn at this multiple and scaled down: Pillow draws
# neither antialiased, and the scaled-down result is.
SUPERSAMPLE = 2


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def text_width(text: str, size: int) -> float:
    return font(size * SUPERSAMPLE).getlength(text) / SUPERSAMPLE


def fit(text: str, width: float, size: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels."""
    if text_width(text, size) <= width:
        return text
    while text and text_width(text + "…", size) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def wrap(text: str, width: float, size: int) -> list[str]:
    """Words of ``text`` broken into lines no wider than ``width``."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and text_width(trial, size) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


class Canvas:
    """Coordinates in output pixels; drawn at SUPERSAMPLE x, scaled down once.

    Pasted images are placed after the scale-down, so their pixels reach the
    PNG unchanged (the filter tiles must show the weights exactly)."""

    def __init__(self, width: int, height: int, background: str = BACKGROUND):
        self.width, self.height, self.background = int(width), int(height), background
        s = SUPERSAMPLE
        self._big = Image.new("RGB", (self.width * s, self.height * s), background)
        self._draw = ImageDraw.Draw(self._big)
        self._pastes: list[tuple[Image.Image, tuple[int, int]]] = []

    def _xy(self, points):
        return [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points]

    def line(self, points, colour: str = INK, width: float = 1, dash: tuple[int, int] | None = None) -> None:
        w = max(1, round(width * SUPERSAMPLE))
        points = self._xy(points)
        if dash is None:
            self._draw.line(points, fill=colour, width=w, joint="curve")
            return
        on, off = dash[0] * SUPERSAMPLE, dash[1] * SUPERSAMPLE
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            length = math.hypot(x1 - x0, y1 - y0)
            pos = 0.0
            while pos < length:
                end = min(length, pos + on)
                a, b = pos / length, end / length
                self._draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)),
                                 (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=colour, width=w)
                pos = end + off

    def rect(self, box, fill: str | None = None, outline: str | None = None, width: float = 1,
             radius: float = 0) -> None:
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in box)
        self._draw.rounded_rectangle((x0, y0, x1, y1), radius=radius * SUPERSAMPLE, fill=fill,
                                     outline=outline, width=max(1, round(width * SUPERSAMPLE)))

    def circle(self, centre, radius: float, fill: str, outline: str | None = None) -> None:
        (x, y), = self._xy([centre])
        r = radius * SUPERSAMPLE
        self._draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=outline)

    def polygon(self, points, fill: str) -> None:
        self._draw.polygon(self._xy(points), fill=fill)

    def text(self, xy, text: str, size: int = 13, colour: str = INK, anchor: str = "la") -> None:
        """``anchor``: Pillow's two letters, horizontal (l, m, r) then vertical
        (a ascender, m middle, s baseline, d descender)."""
        (x, y), = self._xy([xy])
        self._draw.text((x, y), text, fill=colour, font=font(size * SUPERSAMPLE), anchor=anchor)

    def vertical_text(self, xy, text: str, size: int = 13, colour: str = INK) -> None:
        """Text reading bottom to top, centred on ``xy`` (a y-axis label)."""
        w, h = math.ceil(text_width(text, size)) + 4, size + 6
        strip = Image.new("RGBA", (w * SUPERSAMPLE, h * SUPERSAMPLE), (0, 0, 0, 0))
        ImageDraw.Draw(strip).text((w * SUPERSAMPLE / 2, h * SUPERSAMPLE / 2), text, fill=colour,
                                   font=font(size * SUPERSAMPLE), anchor="mm")
        strip = strip.rotate(90, expand=True)
        x, y = xy[0] * SUPERSAMPLE - strip.width // 2, xy[1] * SUPERSAMPLE - strip.height // 2
        self._big.paste(strip, (round(x), round(y)), strip)

    def paste(self, image: Image.Image, xy) -> None:
        self._pastes.append((image, (round(xy[0]), round(xy[1]))))

    def image(self) -> Image.Image:
        out = self._big.resize((self.width, self.height), Image.LANCZOS)
        for image, xy in self._pastes:
            out.paste(image.convert("RGB"), xy)
        return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) covering lo..hi."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-6:
        if value >= lo - step * 1e-6:
            ticks.append(round(value, 10))
        value += step
    return ticks


def tick_label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.1e}"


@dataclass
class Chart:
    """Axes in ``box`` (left, top, right, bottom) of ``canvas``; data ranges
    map linearly onto it."""

    canvas: Canvas
    box: tuple[float, float, float, float]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    x_label: str = ""
    y_label: str = ""
    title: str = ""
    x_ticks: list[float] | None = None

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    def axes(self) -> None:
        c, (left, top, right, bottom) = self.canvas, self.box
        for y in nice_ticks(*self.y_range):
            _, py = self.px(self.x_range[0], y)
            c.line([(left, py), (right, py)], GRID)
            c.line([(left - 4, py), (left, py)], INK)
            c.text((left - 7, py), tick_label(y), 12, MUTED, "rm")
        for x in self.x_ticks if self.x_ticks is not None else nice_ticks(*self.x_range):
            px, _ = self.px(x, self.y_range[0])
            c.line([(px, bottom), (px, bottom + 4)], INK)
            c.text((px, bottom + 7), tick_label(x), 12, MUTED, "ma")
        c.line([(left, top), (left, bottom), (right, bottom)], INK)
        if self.x_label:
            c.text(((left + right) / 2, bottom + 26), self.x_label, 13, INK, "ma")
        if self.y_label:
            c.vertical_text((left - 48, (top + bottom) / 2), self.y_label, 13)
        if self.title:
            c.text((left, top - 10), self.title, 14, INK, "ls")

    def series(self, points, colour: str, width: float = 2, dash: tuple[int, int] | None = None,
               marker: str = "o") -> None:
        xy = [self.px(x, y) for x, y in points]
        if len(xy) > 1:
            self.canvas.line(xy, colour, width, dash)
        for p in xy:
            draw_marker(self.canvas, p, marker, colour)

    def vline(self, x: float, colour: str, dash=(4, 3)) -> None:
        px, top = self.px(x, self.y_range[1])
        _, bottom = self.px(x, self.y_range[0])
        self.canvas.line([(px, top), (px, bottom)], colour, 1, dash)


def draw_marker(canvas: Canvas, p, marker: str, colour: str, r: float = 3.2) -> None:
    x, y = p
    if marker == "o":
        canvas.circle(p, r, colour)
    elif marker == "s":
        canvas.rect((x - r, y - r, x + r, y + r), fill=colour)
    elif marker == "^":
        canvas.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], colour)
    elif marker == "d":
        canvas.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], colour)


def legend_entry(canvas: Canvas, xy, label: str, colour: str, dash=None, marker: str | None = "o",
                 size: int = 12) -> float:
    """A line sample and its label at ``xy`` (left, middle); returns the width used."""
    x, y = xy
    canvas.line([(x, y), (x + 26, y)], colour, 2, dash)
    if marker:
        draw_marker(canvas, (x + 13, y), marker, colour)
    canvas.text((x + 32, y), label, size, INK, "lm")
    return 32 + text_width(label, size)


def upscale(tile: np.ndarray, scale: int) -> Image.Image:
    """A uint8 (h, w) or (h, w, 3) array as an image, each pixel a ``scale`` square
    (nearest neighbour: the weights' pixels stay visible as blocks)."""
    image = Image.fromarray(tile)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


# --- curves ---------------------------------------------------------------------------


CURVES = [  # metrics.jsonl key, legend label, dash, marker
    ("train_error", "training top-1 (minibatches)", (2, 3), "s"),
    ("val_top1_error", "validation top-1", None, "o"),
    ("val_top5_error", "validation top-{k}", (8, 4), "^"),
]


def curves_picture(series: list[tuple[str, list[dict]]]) -> Image.Image:
    """Error (%) and loss per epoch for one or more runs: colour per metric for
    one run, per run (line style per metric) when comparing."""
    comparing = len(series) > 1
    canvas = Canvas(900, 684)
    canvas.text((24, 30), "Training curves: " + (" vs ".join(n for n, _ in series)), 16, INK, "ls")
    ks = {records[-1].get("k", 5) for _, records in series}
    k = ks.pop() if len(ks) == 1 else "k"  # runs with fewer than 5 classes record a smaller k

    # Legend: metrics (and runs when comparing), flowed in rows under the title.
    entries = [(label.format(k=k), INK if comparing else PALETTE[i], dash, marker)
               for i, (_, label, dash, marker) in enumerate(CURVES)]
    if comparing:
        entries = [(fit(name, 220, 12), PALETTE[r % len(PALETTE)], None, None)
                   for r, (name, _) in enumerate(series)] + entries
    x, y = 80.0, 52.0
    for label, colour, dash, marker in entries:
        width = 32 + text_width(label, 12)
        if x + width > 880:
            x, y = 80.0, y + 20
        x += legend_entry(canvas, (x, y), label, colour, dash, marker) + 22
    top = y + 40

    last_epoch = max(r["epoch"] for _, records in series for r in records)
    x_ticks = list(range(0, last_epoch + 1)) if last_epoch <= 12 else nice_ticks(0, last_epoch)
    errors = [100 * r[key] for _, rs in series for r in rs for key, *_ in CURVES if r.get(key) is not None]
    losses = [r["train_loss"] for _, rs in series for r in rs if r.get("train_loss") is not None]
    error_chart = Chart(canvas, (90, top, 870, top + 270), (0, last_epoch), (0, _upper(max(errors, default=1))),
                        "", "error (%)", x_ticks=x_ticks)
    loss_chart = Chart(canvas, (90, top + 330, 870, 620), (0, last_epoch), (0, _upper(max(losses, default=1))),
                       "epoch", "training loss", x_ticks=x_ticks)
    error_chart.axes()
    loss_chart.axes()
    _lr_marks(series, [error_chart, loss_chart], comparing)
    for r, (_, records) in enumerate(series):
        run_colour = PALETTE[r % len(PALETTE)]
        for i, (key, _, dash, marker) in enumerate(CURVES):
            points = [(rec["epoch"], 100 * rec[key]) for rec in records if rec.get(key) is not None]
            error_chart.series(points, run_colour if comparing else PALETTE[i], 2, dash, marker)
        points = [(rec["epoch"], rec["train_loss"]) for rec in records if rec.get("train_loss") is not None]
        loss_chart.series(points, run_colour, 2, None, "o")
    return canvas.image()


def _upper(value: float) -> float:
    ticks = nice_ticks(0, value)
    return ticks[-1] if ticks[-1] >= value else ticks[-1] + (ticks[1] - ticks[0])


def lr_changes(records: list[dict]) -> list[tuple[float, float]]:
    """(x, new lr_scale) where an epoch's lr_scale differs from the epoch
    before; x is the end of that earlier epoch, where the new rate began."""
    return [(float(before["epoch"]), rec["lr_scale"]) for before, rec in zip(records, records[1:])
            if rec.get("lr_scale") != before.get("lr_scale")]


def _lr_marks(series, charts: list[Chart], comparing: bool) -> None:
    marks: dict[tuple[float, str], set[str]] = {}
    for r, (_, records) in enumerate(series):
        for x, scale in lr_changes(records):
            marks.setdefault((x, f"lr x{scale:.3g}"), set()).add(PALETTE[r % len(PALETTE)] if comparing else MUTED)
    right_edge, row = -1e9, 0
    for (x, label), colours in sorted(marks.items()):
        colour = colours.pop() if len(colours) == 1 else MUTED  # shared by several runs: neutral
        for chart in charts:
            chart.vline(x, colour)
        px, top = charts[0].px(x, charts[0].y_range[1])
        row = row + 1 if px + 3 < right_edge else 0  # step down rather than overlap the previous label
        charts[0].canvas.text((px + 3, top + 3 + 14 * row), label, 11, colour, "la")
        right_edge = px + 6 + text_width(label, 11)


# --- filters --------------------------------------------------------------------------


@dataclass
class FilterGrid:
    image: Image.Image
    boxes: list[tuple[int, int, int, int]]  # (left, top, right, bottom) of tile i, in picture pixels
    note: str


def kernel_tile(kernel: np.ndarray) -> np.ndarray:
    """uint8 (k, k, channels): 0 is mid-grey, the kernel's largest |w| is 0 or 255."""
    peak = np.abs(kernel).max()
    scaled = kernel / peak if peak > 0 else np.zeros_like(kernel)
    return np.clip(np.rint(127.5 + 127.5 * scaled), 0, 255).astype(np.uint8).transpose(1, 2, 0)


NORMALISATION = ("each {unit} is divided by its own largest |weight| ({scope}) and mapped linearly onto "
                 "0..255: a weight of 0 shows as 128 (mid-grey), +max as 255, -max as 0")


def filter_picture(layer: Layer, weight: np.ndarray, epoch: int, colour: bool = True, max_filters: int = 32,
                   max_channels: int = 48) -> FilterGrid:
    """``colour`` (a layer reading the RGB image): one colour tile per kernel,
    16 to a row (the paper's Figure 3).  Otherwise a row per filter and a grey
    tile per input channel, the first ``max_filters`` x ``max_channels``."""
    filters, channels, k, _ = weight.shape
    device = f"gpu {','.join(map(str, layer.gpu))}"
    if colour and channels == 3:
        tiles = [kernel_tile(w) for w in weight]
        columns = 16 if filters >= 32 else min(filters, 8)
        scale, gap = max(1, math.ceil(40 / k)), 3
        title = f"{layer.name} ({device}): {filters} kernels of {k}x{k}x3, epoch {epoch}"
        note = NORMALISATION.format(unit="kernel", scope="one factor for its R, G and B") + "."
    else:
        shown_f, shown_c = min(filters, max_filters), min(channels, max_channels)
        tiles = []
        for w in weight[:shown_f]:
            tile = kernel_tile(w)
            tiles += [tile[:, :, c] for c in range(shown_c)]
        columns = shown_c
        scale, gap = max(1, math.ceil(20 / k)), 2
        title = (f"{layer.name} ({device}): {filters} filters of {k}x{k}x{channels}, epoch {epoch}; "
                 f"rows: filters 1-{shown_f}, columns: input channels 1-{shown_c}")
        note = NORMALISATION.format(unit="filter", scope=f"one factor for all its {channels} channels") + "."
    side = k * scale
    rows = math.ceil(len(tiles) / columns)
    grid_w, grid_h = columns * (side + gap) - gap, rows * (side + gap) - gap
    width = max(grid_w + 32, 560)
    lines = [(line, 14, INK) for line in wrap(title, width - 32, 14)]
    lines += [(line, 12, MUTED) for line in wrap("Display: " + note, width - 32, 12)]
    head = 16 + 18 * len(lines)
    canvas = Canvas(width, head + grid_h + 20)
    for n, (line, size, ink) in enumerate(lines):
        canvas.text((16, 24 + 18 * n), line, size, ink, "ls")
    left, top = (width - grid_w) // 2, head + 6
    canvas.rect((left - 2, top - 2, left + grid_w + 1, top + grid_h + 1), fill="#DDDDDD")
    boxes = []
    for i, tile in enumerate(tiles):
        x = left + (i % columns) * (side + gap)
        y = top + (i // columns) * (side + gap)
        canvas.paste(upscale(tile, scale), (x, y))
        boxes.append((x, y, x + side, y + side))
    return FilterGrid(canvas.image(), boxes, f"{title}. Display: {note}")


# --- predictions and neighbours -------------------------------------------------------


def thumbnail(crop: np.ndarray, side: int) -> Image.Image:
    image = Image.fromarray(crop)
    # Small images (CIFAR) grow as crisp blocks; large ones shrink smoothly.
    return image.resize((side, side), Image.NEAREST if image.width < side else Image.LANCZOS)


CELL_W, THUMB, BAR_PITCH = 214, 128, 20
TRUE_BAR, OTHER_BAR, TRACK = "#F2A49B", "#B9D3EA", "#F1F1F1"


def preds_picture(crops: list[np.ndarray], probs: np.ndarray, labels: np.ndarray, names: list[str],
                  title: str) -> Image.Image:
    """The paper's Figure 4 (left): each image over its true class and top-k bars."""
    k = min(5, probs.shape[1])
    columns = min(len(crops), 4 if len(crops) <= 16 else 6)
    rows = math.ceil(len(crops) / columns)
    cell_h = THUMB + 26 + k * BAR_PITCH + 26
    key = (f"Under each image: its true class, then the top-{k} predictions with their probabilities; "
           "red bar: the true class.")
    width = max(32 + columns * CELL_W, 24 + text_width(title, 16) + 8, 24 + text_width(key, 12) + 8)
    canvas = Canvas(width, 70 + rows * cell_h)
    canvas.text((16, 28), title, 16, INK, "ls")
    canvas.text((16, 48), key, 12, MUTED, "ls")
    for i, (crop, p, label) in enumerate(zip(crops, probs, labels)):
        x0, y0 = 16 + (i % columns) * CELL_W, 66 + (i // columns) * cell_h
        canvas.paste(thumbnail(crop, THUMB), (x0 + (CELL_W - THUMB) // 2, y0))
        ranked = np.argsort(-p)[:k]
        true_name = fit(names[label], CELL_W - 16, 13)
        canvas.text((x0 + CELL_W / 2, y0 + THUMB + 18), true_name, 13, INK, "ms")
        if label not in ranked:
            canvas.text((x0 + CELL_W / 2, y0 + THUMB + 26 + k * BAR_PITCH + 11), f"(true class not in top {k})", 11,
                        PALETTE[1], "ms")
        for r, c in enumerate(ranked):
            left, right = x0 + 8, x0 + CELL_W - 8
            top = y0 + THUMB + 26 + r * BAR_PITCH
            canvas.rect((left, top, right, top + BAR_PITCH - 3), fill=TRACK)
            canvas.rect((left, top, left + max(1.0, (right - left) * float(p[c])), top + BAR_PITCH - 3),
                        fill=TRUE_BAR if c == label else OTHER_BAR)
            percent = f"{100 * p[c]:.0f}%" if p[c] >= 0.005 else "<1%"
            canvas.text((right - 4, top + (BAR_PITCH - 3) / 2), percent, 11, INK, "rm")
            canvas.text((left + 4, top + (BAR_PITCH - 3) / 2), fit(names[c], right - left - 44, 12), 12, INK, "lm")
    return canvas.image()


N_THUMB, N_CELL = 96, 108


def neighbours_picture(rows, names: list[str], title: str) -> Image.Image:
    """The paper's Figure 4 (right): a test image, then its nearest training images.
    ``rows``: ((crop, label), [(crop, label, distance), ...]) per test image."""
    count = max(len(found) for _, found in rows)
    width = max(16 + N_CELL + 24 + count * N_CELL + 8, 24 + text_width(title, 15) + 8)
    row_h = N_THUMB + 42
    canvas = Canvas(width, 78 + len(rows) * row_h)
    canvas.text((16, 28), title, 15, INK, "ls")
    canvas.text((16, 50), "test image", 12, MUTED, "ls")
    canvas.text((16 + N_CELL + 24, 50), "nearest training images (class, distance)", 12, MUTED, "ls")
    split = 16 + N_CELL + 10
    canvas.line([(split, 58), (split, 66 + len(rows) * row_h - 14)], GRID, 2)
    for r, ((crop, label), found) in enumerate(rows):
        y = 62 + r * row_h
        canvas.paste(thumbnail(crop, N_THUMB), (16 + (N_CELL - N_THUMB) // 2, y))
        canvas.text((16 + N_CELL / 2, y + N_THUMB + 15), fit(names[label], N_CELL - 4, 12), 12, INK, "ms")
        for n, (image, found_label, distance) in enumerate(found):
            x = 16 + N_CELL + 24 + n * N_CELL
            canvas.paste(thumbnail(image, N_THUMB), (x + (N_CELL - N_THUMB) // 2, y))
            colour = PALETTE[2] if found_label == label else INK
            canvas.text((x + N_CELL / 2, y + N_THUMB + 15), fit(names[found_label], N_CELL - 4, 12), 12, colour,
                        "ms")
            canvas.text((x + N_CELL / 2, y + N_THUMB + 29), f"{distance:.3g}", 11, MUTED, "ms")
    return canvas.image()


# --- net ------------------------------------------------------------------------------


BOX_W, BOX_H, PITCH_X, PITCH_Y, STUB = 224, 40, 300, 100, 18
DATA_COLOUR = "#777777"


def placement(groups: list[int], devices: list[str]) -> str:
    """Where the run put each gpu= group (spec index modulo the device count)."""
    if not devices:
        return ""
    by_device: dict[str, list[str]] = {}
    for g in groups:
        by_device.setdefault(devices[g % len(devices)], []).append(f"gpu {g}")
    return "This run ran " + "; ".join(f"{', '.join(names)} on {device}" for device, names in by_device.items()) + "."


def _tint(colour: str, amount: float = 0.84) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#%02x%02x%02x" % tuple(round(v + (255 - v) * amount) for v in (r, g, b))


def _compact(n: int) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def device_colour(layer: Layer) -> str:
    return PALETTE[layer.gpu[0] % len(PALETTE)] if layer.gpu else DATA_COLOUR


def layer_rows(checked) -> list[list[Layer]]:
    """Rows top to bottom: a layer sits one row below its deepest input; a
    data layer sits just above its first reader (labels beside the softmax)."""
    layers = checked.layers
    rank: dict[str, int] = {}
    for layer in layers.values():  # topological order
        if layer.type != "data":
            rank[layer.name] = 1 + max((rank.get(s, 0) for s in layer.inputs), default=0)
    for layer in layers.values():
        if layer.type == "data":
            readers = [rank[c] for c in checked.consumers(layer.name) if c in rank]
            rank[layer.name] = min(readers) - 1 if readers else 0
    position = {name: i for i, name in enumerate(layers)}
    rows: list[list[Layer]] = [[] for _ in range(max(rank.values()) + 1)]
    for name in sorted(rank, key=lambda n: (layers[n].type == "data" and rank[n] > 0,
                                            layers[n].gpu[0] if layers[n].gpu else -1, position[n])):
        rows[rank[name]].append(layers[name])
    return [row for row in rows if row]


def net_picture(checked, devices: list[str] | None = None) -> Image.Image:
    rows = layer_rows(checked)
    widest = max(len(row) for row in rows)
    groups = sorted({g for layer in checked.layers.values() for g in layer.gpu})
    title = f"{Path(checked.path).name}: {len(checked.layers)} layers, {checked.total_params:,} parameters"
    width = max(widest * PITCH_X + 60, 640, 40 + text_width(title, 16))
    top = 96
    canvas = Canvas(width, top + len(rows) * PITCH_Y)
    canvas.text((20, 30), title, 16, INK, "ls")
    x = 20.0
    for label, colour in [(f"gpu {g}", PALETTE[g % len(PALETTE)]) for g in groups] + [("data", DATA_COLOUR)]:
        canvas.rect((x, 46, x + 18, 60), fill=_tint(colour), outline=colour, width=1.5, radius=3)
        canvas.text((x + 24, 53), label, 12, INK, "lm")
        x += 24 + text_width(label, 12) + 18
    x += legend_entry(canvas, (x, 53), "tensor on one device", "#555555", None, None) + 18
    legend_entry(canvas, (x, 53), "crosses gpu groups", "#555555", (6, 4), None)
    canvas.text((20, 78), placement(groups, devices or []) or "Edge label: shape, float32 size per image.",
                12, MUTED, "ls")

    centre: dict[str, tuple[float, float]] = {}
    for r, row in enumerate(rows):
        for i, layer in enumerate(row):
            centre[layer.name] = (width / 2 + (i - (len(row) - 1) / 2) * PITCH_X, top + r * PITCH_Y + BOX_H / 2)
    for layer in checked.layers.values():  # edges under the boxes
        readers = checked.consumers(layer.name)
        if not readers:
            continue
        sx, sy = centre[layer.name]
        start = (sx, sy + BOX_H / 2 + STUB)
        canvas.line([(sx, sy + BOX_H / 2), start], "#555555", 1.5)
        size = f"{fmt_shape(layer.shape)} · {_bytes(4 * numel(layer.shape))}"
        canvas.text((sx + 6, sy + BOX_H / 2 + STUB / 2 + 1), size, 11, MUTED, "lm")
        for reader in readers:
            dx, dy = centre[reader]
            crosses = bool(layer.gpu) and checked.layers[reader].gpu[0] != layer.gpu[0]
            end = (dx, dy - BOX_H / 2 - 1)
            canvas.line([start, end], "#555555", 1.5, (6, 4) if crosses else None)
            _arrowhead(canvas, start, end)
    for layer in checked.layers.values():
        cx, cy = centre[layer.name]
        colour = device_colour(layer)
        box = (cx - BOX_W / 2, cy - BOX_H / 2, cx + BOX_W / 2, cy + BOX_H / 2)
        canvas.rect(box, fill=_tint(colour), outline=colour, width=1.5, radius=5)
        placed = f"gpu {','.join(map(str, layer.gpu))}" if layer.gpu else "input"
        canvas.text((box[0] + 8, cy - 7), fit(layer.name, BOX_W - 70, 13), 13, INK, "lm")
        canvas.text((box[2] - 8, cy - 7), placed, 11, colour, "rm")
        shape = "cost" if layer.type.startswith("cost.") else fmt_shape(layer.shape)
        detail = f"{layer.type} · {shape}" + (f" · {_compact(layer.params)} params" if layer.params else "")
        canvas.text((box[0] + 8, cy + 10), fit(detail, BOX_W - 16, 11), 11, "#444444", "lm")
    return canvas.image()


def _arrowhead(canvas: Canvas, start, end, length: float = 8, half: float = 4) -> None:
    (x0, y0), (x1, y1) = start, end
    norm = math.hypot(x1 - x0, y1 - y0) or 1
    ux, uy = (x1 - x0) / norm, (y1 - y0) / norm
    bx, by = x1 - ux * length, y1 - uy * length
    canvas.polygon([(x1, y1), (bx - uy * half, by + ux * half), (bx + uy * half, by - ux * half)], "#555555")
