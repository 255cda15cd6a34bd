"""Pictures a training run logs: normals as colours, render overlays, landmark dots, labelled image grids.

Conventions: images are float32 RGB in [0,1], (B,3,H,W), origin top-left, pixel centres at +0.5, so a landmark at
pixel coordinate (x, y) lies at array position (x-0.5, y-0.5); landmarks are (B,L,2) pixel coordinates, x right,
y down; normals are (B,3,H,W) unit vectors, 0 on background. Everything here is for logging: no gradients, the
results are detached CPU tensors or numpy arrays.

Grid geometry (``image_grid``): each cell is H x W; cells are separated by ``SEPARATOR`` white pixels (between
rows and between columns, none around the border); with ``label=True`` a black header strip ``HEADER_HEIGHT``
pixels high sits on top, holding each column's name above that column. So the grid is
``HEADER_HEIGHT * label + R*H + (R-1)*SEPARATOR`` by ``C*W + (C-1)*SEPARATOR``, and cell (r, c) starts at
row ``HEADER_HEIGHT * label + r*(H+SEPARATOR)``, column ``c*(W+SEPARATOR)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

__all__ = ["HEADER_HEIGHT", "SEPARATOR", "draw_landmarks", "image_grid", "normals_to_rgb", "overlay", "save_png"]

HEADER_HEIGHT = 20  # pixels of the label strip on top of the grid
SEPARATOR = 2  # pixels between neighbouring cells
SEPARATOR_VALUE = 255  # separators are white
HEADER_VALUE = 0  # header background is black, text is white
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.4
_SHIFT = 4  # fractional bits of the sub-pixel circle centres


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float32)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,C,H,W) float in [0,1] (or uint8) -> (B,H,W,C) contiguous uint8."""
    if images.dtype == torch.uint8:
        array = images.detach().cpu()
    else:
        array = (_cpu(images).clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(array.permute(0, 2, 3, 1).numpy())


@torch.no_grad()
def normals_to_rgb(normals: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) unit normals -> (B,3,H,W) colours 0.5*(n+1); zero-length normals (background) stay black."""
    normals = _cpu(normals)
    foreground = normals.norm(dim=1, keepdim=True) > 1e-6
    return ((normals + 1) * 0.5).clamp(0, 1) * foreground


@torch.no_grad()
def overlay(image: torch.Tensor, render: torch.Tensor, alpha: torch.Tensor, opacity: float = 0.6) -> torch.Tensor:
    """Blend ``render`` (B,3,H,W) over ``image`` (B,3,H,W) where ``alpha`` (B,1,H,W) covers it -> (B,3,H,W).

    out = image * (1 - opacity*alpha) + render * opacity*alpha, so alpha 0 gives the input and alpha 1 with
    opacity 1 the render.
    """
    image, render, alpha = _cpu(image), _cpu(render), _cpu(alpha)
    if alpha.dim() == 3:
        alpha = alpha[:, None]
    weight = alpha.clamp(0, 1) * float(opacity)
    return image * (1 - weight) + render * weight


def _dots(canvas: np.ndarray, points: np.ndarray, color, radius: int) -> None:
    """Draw filled anti-aliased dots of ``color`` (RGB in [0,1]) at pixel coordinates ``points`` (L,2)."""
    height, width = canvas.shape[:2]
    value = tuple(int(round(255 * float(c))) for c in color)
    scale = 1 << _SHIFT
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        col, row = x - 0.5, y - 0.5  # array position of the pixel coordinate
        if not (-radius - 1 <= col <= width + radius and -radius - 1 <= row <= height + radius):
            continue
        centre = (int(round(col * scale)), int(round(row * scale)))
        cv2.circle(canvas, centre, radius * scale, value, thickness=-1, lineType=cv2.LINE_AA, shift=_SHIFT)


@torch.no_grad()
def draw_landmarks(images: torch.Tensor, points: torch.Tensor, color=(0.0, 1.0, 0.0), radius: int | None = None,
                   reference: torch.Tensor | None = None, reference_color=(1.0, 0.0, 0.0)) -> torch.Tensor:
    """Dots at ``points`` (B,L,2) pixel coordinates on a copy of ``images`` (B,3,H,W) -> (B,3,H,W) in [0,1].

    ``reference`` (B,L',2), e.g. the target landmarks, is drawn first in ``reference_color`` so the predicted dots
    stay on top. ``radius`` defaults to max(1, H//100) pixels. Colours are RGB in [0,1]; the result is quantised to
    8 bits.
    """
    canvas = _to_uint8(images)
    if radius is None:
        radius = max(1, canvas.shape[1] // 100)
    layers = [] if reference is None else [(_cpu(reference).numpy(), reference_color)]
    layers.append((_cpu(points).numpy(), color))
    for batch, sample in enumerate(canvas):
        for coords, colour in layers:
            _dots(sample, coords[batch].tolist(), colour, int(radius))
    return torch.from_numpy(canvas).permute(0, 3, 1, 2).float() / 255


def _header(names: list[str], width: int) -> np.ndarray:
    """(HEADER_HEIGHT, C*W + (C-1)*SEPARATOR, 3) uint8 strip with each name centred above its column."""
    count = len(names)
    strip = np.full((HEADER_HEIGHT, count * width + (count - 1) * SEPARATOR, 3), HEADER_VALUE, np.uint8)
    for index, name in enumerate(names):
        cell = np.full((HEADER_HEIGHT, width, 3), HEADER_VALUE, np.uint8)  # own buffer: text never spills over
        text = str(name)
        while text and cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)[0][0] > width - 2:
            text = text[:-1]
        (text_width, text_height), _ = cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)
        origin = (max(1, (width - text_width) // 2), (HEADER_HEIGHT + text_height) // 2)
        cv2.putText(cell, text, origin, _FONT, _FONT_SCALE, (255, 255, 255), 1, cv2.LINE_AA)
        left = index * (width + SEPARATOR)
        strip[:, left:left + width] = cell
        if index + 1 < count:
            strip[:, left + width:left + width + SEPARATOR] = SEPARATOR_VALUE
    return strip


@torch.no_grad()
def image_grid(columns: dict[str, torch.Tensor], max_rows: int = 8, label: bool = True) -> np.ndarray:
    """One column per named image set, one row per sample -> (H_total, W_total, 3) uint8 RGB.

    Each value is (B,3,H,W) or (B,1,H,W) (replicated to 3 channels), float in [0,1] or uint8; all must share B, H
    and W, else ValueError naming the mismatching column. The first ``max_rows`` samples are shown. See the module
    docstring for the geometry (HEADER_HEIGHT, SEPARATOR).
    """
    if not columns:
        raise ValueError("image_grid needs at least one column")
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    names = list(columns)
    first, expected = names[0], None
    cells = []
    for name in names:
        images = columns[name]
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"column {name!r}: expected (B,3,H,W) or (B,1,H,W), got {tuple(images.shape)}")
        batch, _, height, width = images.shape
        if expected is None:
            expected = (batch, height, width)
        elif (batch, height, width) != expected:
            raise ValueError(f"column {name!r} has (B,H,W)={(batch, height, width)}, but column {first!r} "
                             f"has {expected}")
        images = images[:max_rows]
        cells.append(_to_uint8(images.expand(-1, 3, -1, -1)))
    batch, height, width = expected
    rows, count = min(batch, max_rows), len(names)
    top = HEADER_HEIGHT if label else 0
    grid = np.full((top + rows * height + max(rows - 1, 0) * SEPARATOR, count * width + (count - 1) * SEPARATOR, 3),
                   SEPARATOR_VALUE, np.uint8)
    if label:
        grid[:HEADER_HEIGHT] = _header(names, width)
    for c, column in enumerate(cells):
        left = c * (width + SEPARATOR)
        for r in range(rows):
            y = top + r * (height + SEPARATOR)
            grid[y:y + height, left:left + width] = column[r]
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write ``array`` (H,W,3) uint8 RGB (or (H,W) grey) to a PNG at ``path``, creating parent folders."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"save_png expects (H,W,3) or (H,W) uint8, got {array.dtype} {array.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), np.ascontiguousarray(array)):
        raise OSError(f"could not write PNG {path}")
    return path
