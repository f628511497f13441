"""Pictures of predictions (Pillow only, no font file): text sized to the image, legends, labelled boxes.

Shared by the tasks' ``write_predictions`` (``fishnet_pl.tasks``); plain Python, no Lightning.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def text_font(height: int, width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font (no font file needed) at a size that reads on an image of this size:
    1/40 of its short side, at least 10 pixels."""
    return ImageFont.load_default(size=max(10, min(height, width) // 40))


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones."""
    return (0, 0, 0) if 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2] > 128 else (255,) * 3


def legend_strip(entries: list[tuple[str, tuple[int, int, int]]], width: int, font) -> np.ndarray:
    """An ``N x width x 3`` uint8 strip on dark grey: for each (name, colour), a swatch and the name, in as many
    rows as the width needs."""
    line = sum(font.getmetrics())  # ascent + descent: every name on one baseline
    pad, draw = max(2, line // 3), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    places, x, y = [], pad, pad
    for name, _ in entries:
        size = line + pad + draw.textlength(name, font=font)
        if x > pad and x + size > width - pad:  # wrap: the next row
            x, y = pad, y + line + pad
        places.append((x, y))
        x += size + 2 * pad
    strip = Image.new("RGB", (width, y + line + pad), (40, 40, 40))
    draw = ImageDraw.Draw(strip)
    for (name, colour), (x, y) in zip(entries, places):
        draw.rectangle((x, y, x + line - 1, y + line - 1), fill=colour)
        draw.text((x + line + pad, y), name, fill=(255, 255, 255), font=font, anchor="la")
    return np.asarray(strip)


def draw_boxes(image: torch.Tensor, boxes: torch.Tensor, labels: list[str],
               colours: list[tuple[int, int, int]]) -> Image.Image:
    """``image`` (uint8 [3, H, W]) with each box (xyxy pixels) outlined and its label on a box-coloured tag above
    it (inside it at the image's top edge); line width and text scale with the image.

    Not torchvision's ``draw_bounding_boxes``: its text scales only with a TrueType font file, which not every
    machine has; Pillow's built-in font does (``text_font``)."""
    height, width = image.shape[-2:]
    drawn = Image.fromarray(image.permute(1, 2, 0).numpy())
    draw, font, line = ImageDraw.Draw(drawn), text_font(height, width), max(2, min(height, width) // 300)
    for (x0, y0, x1, y1), label, colour in zip(boxes.tolist(), labels, colours):
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text_h = sum(font.getmetrics())  # ascent + descent
        pad = max(1, text_h // 6)
        tag_w, tag_h = round(draw.textlength(label, font=font)) + 2 * pad, text_h + 2 * pad
        x, y = max(0, min(x0, width - tag_w)), y0 - tag_h if y0 >= tag_h else y0
        draw.rectangle((x, y, x + tag_w - 1, y + tag_h - 1), fill=colour)
        draw.text((x + pad, y + pad), label, fill=text_colour(colour), font=font, anchor="la")
    return drawn
