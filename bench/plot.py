"""The drain plot (`bench/results/drain.png`), drawn without dependencies.

A tiny raster canvas (filled rectangles, lines, a 5x7 bitmap font) and a PNG writer (zlib + struct),
so the suite draws its plot on every run, the CI smoke run included, with nothing to install.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (30, 30, 30)
GRID: Color = (225, 225, 225)
AXIS: Color = (120, 120, 120)
ENGINE: Color = (52, 101, 164)
RAW: Color = (170, 170, 170)

# 5x7 glyphs, one string of 7 rows per character; '#' is ink. Lower case is drawn as upper case.
_FONT_ROWS = {
    "A": " ### #   ##   #######   ##   ##   #", "B": "#### #   ##   ##### #   ##   ##### ",
    "C": " ### #   ##    #    #    #   # ### ", "D": "#### #   ##   ##   ##   ##   ##### ",
    "E": "######    #    #### #    #    #####", "F": "######    #    #### #    #    #    ",
    "G": " ### #   ##    # ####   ##   # ####", "H": "#   ##   ##   #######   ##   ##   #",
    "I": " ###   #    #    #    #    #   ### ", "J": "  ###   #    #    #    # #  #  ##  ",
    "K": "#   ##  # # #  ##   # #  #  # #   #", "L": "#    #    #    #    #    #    #####",
    "M": "#   ### ### # ## # ##   ##   ##   #", "N": "#   ###  ## # ##  ###   ##   ##   #",
    "O": " ### #   ##   ##   ##   ##   # ### ", "P": "#### #   ##   ##### #    #    #    ",
    "Q": " ### #   ##   ##   ## # ##  #  ## #", "R": "#### #   ##   ##### # #  #  # #   #",
    "S": " #####    #     ###     #    ##### ", "T": "#####  #    #    #    #    #    #  ",
    "U": "#   ##   ##   ##   ##   ##   # ### ", "V": "#   ##   ##   ##   ##   # # #   #  ",
    "W": "#   ##   ##   ## # ## # ## # # # # ", "X": "#   ##   # # #   #   # # #   ##   #",
    "Y": "#   ##   # # #   #    #    #    #  ", "Z": "#####    #   #   #   #   #    #####",
    "0": " ### #   ##  ### # ###  ##   # ### ", "1": "  #   ##    #    #    #    #   ### ",
    "2": " ### #   #    #   #   #   #   #####", "3": "#####   #   #     #     ##   # ### ",
    "4": "   #   ##  # # #  # #####   #    # ", "5": "######    ####     #    ##   # ### ",
    "6": "  ##  #   #    #### #   ##   # ### ", "7": "#####    #   #   #   #    #    #   ",
    "8": " ### #   ##   # ### #   ##   # ### ", "9": " ### #   ##   # ####    #   #  ##  ",
    " ": " " * 35, ".": " " * 25 + "  ##   ## ", ",": "                     ##    #   #   ",
    ":": "      ##   ##        ##   ##       ", "/": "    #    #   #   #   #   #    #    ",
    "-": " " * 15 + "#####" + " " * 15, "(": "   #   #   #    #    #     #     # ",
    ")": " #     #     #    #    #   #   #   ", "%": "##   ##  #   #   #   #   #  ##   ##",
    "=": " " * 10 + "#####     #####" + " " * 10, "+": "       #    #  #####  #    #       ",
    ">": "#     #     #     #   #   #   #    ", "<": "    #   #   #   #     #     #     #",
    "_": " " * 30 + "#####", "'": "  #    #   #                       ",
}
_FONT = {ch: [rows[i * 5:(i + 1) * 5] for i in range(7)] for ch, rows in _FONT_ROWS.items()}


class Canvas:
    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width = width
        self.height = height
        self.pixels = [bytearray(bytes(background) * width) for _ in range(height)]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        if x0 >= x1:
            return
        span = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            self.pixels[y][3 * x0:3 * x1] = span

    def hline(self, x0: int, x1: int, y: int, color: Color, width: int = 1) -> None:
        self.rect(x0, y, x1, y + width, color)

    def vline(self, x: int, y0: int, y1: int, color: Color, width: int = 1) -> None:
        self.rect(x, y0, x + width, y1, color)

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2,
             align: str = "left") -> None:
        w = self.text_width(text, scale)
        if align == "center":
            x -= w // 2
        elif align == "right":
            x -= w
        for ch in text.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for row, bits in enumerate(glyph):
                for col, bit in enumerate(bits):
                    if bit == "#":
                        self.rect(x + col * scale, y + row * scale, x + (col + 1) * scale, y + (row + 1) * scale,
                                  color)
            x += 6 * scale

    @staticmethod
    def text_width(text: str, scale: int = 2) -> int:
        return max(0, len(text) * 6 * scale - scale)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(row) for row in self.pixels)

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def _short(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}K"
    if value >= 1000:
        return f"{value / 1000:.1f}K"
    return f"{value:.0f}"


def _nice_step(top: float, ticks: int = 5) -> float:
    raw = top / ticks
    magnitude = 10 ** (len(str(int(raw))) - 1) if raw >= 1 else 1
    for factor in (1, 2, 2.5, 5, 10):
        if factor * magnitude >= raw:
            return factor * magnitude
    return 10 * magnitude


def _panel(canvas: Canvas, x: int, y: int, w: int, h: int, title: str, xlabel: str,
           groups: list[str], engine: list[float | None], raw: list[float | None]) -> None:
    canvas.text(x + w // 2, y, title, scale=2, align="center")
    left, right, top, bottom = x + 70, x + w - 10, y + 50, y + h - 60
    values = [v for v in engine + raw if v]
    peak = max(values) if values else 1.0
    step = _nice_step(peak * 1.1)
    ymax = step * max(1, -(-peak * 1.1 // step))

    def ypos(value: float) -> int:
        return bottom - int((bottom - top) * value / ymax)

    tick = 0.0
    while tick <= ymax + 1e-9:
        yy = ypos(tick)
        canvas.hline(left, right, yy, GRID)
        canvas.text(left - 8, yy - 7, _short(tick), AXIS, scale=2, align="right")
        tick += step
    canvas.vline(left, top, bottom + 1, AXIS, 2)
    canvas.hline(left, right, bottom, AXIS, 2)
    slot = (right - left) / max(1, len(groups))
    bar = int(min(60, slot * 0.32))
    for i, label in enumerate(groups):
        centre = int(left + slot * (i + 0.5))
        for value, color, dx in ((engine[i], ENGINE, -bar - 2), (raw[i], RAW, 2)):
            if not value:
                continue
            canvas.rect(centre + dx, ypos(value), centre + dx + bar, bottom, color)
            canvas.text(centre + dx + bar // 2, ypos(value) - 14, _short(value), BLACK, scale=1, align="center")
        canvas.text(centre, bottom + 10, label, BLACK, scale=2, align="center")
    canvas.text(x + w // 2, bottom + 34, xlabel, AXIS, scale=2, align="center")


def drain_plot(path: Path, workers: Mapping[int, float], raw_workers: Mapping[int, float],
               batches: Mapping[int, float], raw_batches: Mapping[int, float], subtitle: str) -> Path:
    """Drain rate (jobs/s) of the engine against workers (batch 500) and against batch size (2 workers),
    each bar next to the raw-SQL ceiling with as many processes at the same batch size."""
    canvas = Canvas(1200, 500)
    canvas.text(600, 12, "SKIPLOCK DRAIN RATE, JOBS/S (NO-OP JOBS)", scale=3, align="center")
    canvas.text(600, 44, subtitle, AXIS, scale=1, align="center")
    w_keys = sorted(set(workers) | set(raw_workers))
    b_keys = sorted(set(batches) | set(raw_batches))
    _panel(canvas, 10, 70, 560, 400, "BY WORKERS (BATCH 500)", "WORKERS / PROCESSES",
           [str(k) for k in w_keys], [workers.get(k) for k in w_keys], [raw_workers.get(k) for k in w_keys])
    _panel(canvas, 620, 70, 570, 400, "BY BATCH SIZE (2 WORKERS)", "BATCH SIZE",
           [str(k) for k in b_keys], [batches.get(k) for k in b_keys], [raw_batches.get(k) for k in b_keys])
    # legend
    canvas.rect(430, 478, 446, 492, ENGINE)
    canvas.text(452, 479, "SKIPLOCK ENGINE", scale=2)
    canvas.rect(680, 478, 696, 492, RAW)
    canvas.text(702, 479, "RAW-SQL CEILING", scale=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canvas.png())
    return path


BEFORE: Color = (204, 85, 0)


def _line(canvas: Canvas, x0: int, y0: int, x1: int, y1: int, color: Color, width: int = 2) -> None:
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(steps + 1):
        x = x0 + (x1 - x0) * i // steps
        y = y0 + (y1 - y0) * i // steps
        canvas.rect(x, y, x + width, y + width, color)


def size_plot(path: Path, series: Mapping[str, list[tuple[float, float]]], subtitle: str,
              colors: tuple[Color, ...] = (BEFORE, ENGINE, RAW)) -> Path:
    """skiplock.jobs total size (MB) against time (s), one line per series (name -> [(s, MB)])."""
    canvas = Canvas(1200, 500)
    canvas.text(600, 12, "SKIPLOCK.JOBS SIZE (HEAP + INDEXES), MB, AT A STEADY OFFERED RATE", scale=2, align="center")
    canvas.text(600, 40, subtitle, AXIS, scale=1, align="center")
    left, right, top, bottom = 90, 1170, 70, 420
    points = [p for values in series.values() for p in values]
    xmax = max((x for x, _ in points), default=1.0) or 1.0
    peak = max((y for _, y in points), default=1.0) or 1.0
    step = _nice_step(peak * 1.1)
    ymax = step * max(1, -(-peak * 1.1 // step))
    xstep = _nice_step(xmax)

    def pos(x: float, y: float) -> tuple[int, int]:
        return left + int((right - left) * x / xmax), bottom - int((bottom - top) * y / ymax)

    tick = 0.0
    while tick <= ymax + 1e-9:
        _, yy = pos(0, tick)
        canvas.hline(left, right, yy, GRID)
        canvas.text(left - 8, yy - 7, _short(tick), AXIS, scale=2, align="right")
        tick += step
    tick = 0.0
    while tick <= xmax + 1e-9:
        xx, _ = pos(tick, 0)
        canvas.text(xx, bottom + 10, _short(tick), AXIS, scale=2, align="center")
        tick += xstep
    canvas.vline(left, top, bottom + 1, AXIS, 2)
    canvas.hline(left, right, bottom, AXIS, 2)
    canvas.text((left + right) // 2, bottom + 34, "SECONDS", AXIS, scale=2, align="center")
    legend_x = left + 20
    for (name, values), color in zip(series.items(), colors):
        for (xa, ya), (xb, yb) in zip(values, values[1:]):
            _line(canvas, *pos(xa, ya), *pos(xb, yb), color)
        canvas.rect(legend_x, 470, legend_x + 16, 484, color)
        canvas.text(legend_x + 22, 471, name, scale=2)
        legend_x += canvas.text_width(name) + 60
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canvas.png())
    return path
