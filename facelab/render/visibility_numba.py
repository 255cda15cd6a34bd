"""Compiled visibility for the torch backend on CPU (numba).

The same z-buffer as :func:`facelab.render.rasterize.visible_triangles`: the same per-triangle
plane coefficients and bounding boxes (computed by the caller in torch), the same float32
arithmetic at each pixel centre, the same quantised depth keys and the same tie-break (lower
triangle id), so both paths give the same triangle per pixel; the plain torch path stays the
reference the tests compare against. Visibility carries no gradients, so compiling it changes
nothing downstream.

numba is optional: :func:`available` says whether it imports. The kernel is compiled on first use
(a few seconds; cached on disk next to this file when the directory is writable).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

DEPTH_LEVELS = 2**31 - 1
NO_HIT = np.iinfo(np.int64).max

_kernel = None


def available() -> bool:
    return importlib.util.find_spec("numba") is not None


def zbuffer(planes: torch.Tensor, lo: torch.Tensor, extent: torch.Tensor, drawable: torch.Tensor,
            batch: int, height: int, width: int) -> torch.Tensor:
    """Nearest triangle id per pixel (B,H,W) int64, -1 for background.

    planes: (B*T,4,3) float32, rows (a, b, c) of the three barycentric weights and the depth;
    lo: (B*T,2) first column and row of each bounding box; extent: (B*T,2) its columns and rows;
    drawable: (B*T,) bool. Triangle k belongs to image k // T.
    """
    kernel = _compile()
    import numba

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    bands = max(1, threads // batch) if batch < threads else 1
    ids = kernel(_numpy(planes, np.float32), _numpy(lo, np.int64), _numpy(extent, np.int64),
                 _numpy(drawable, np.bool_), batch, height, width, bands)
    return torch.from_numpy(ids).to(planes.device)


def _numpy(tensor: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)


def _compile():
    global _kernel
    if _kernel is not None:
        return _kernel
    import numba

    @numba.njit(parallel=True, cache=True, nogil=True)
    def kernel(planes, lo, extent, drawable, batch, height, width, bands):  # pragma: no cover - compiled
        n_triangles = planes.shape[0] // batch
        ids = np.full((batch, height, width), -1, np.int64)
        band_rows = (height + bands - 1) // bands
        half = np.float32(0.5)
        one = np.float32(1.0)
        levels = np.float32(DEPTH_LEVELS)
        for job in numba.prange(batch * bands):
            image = job // bands
            row_start = (job % bands) * band_rows
            row_end = min(height, row_start + band_rows)
            keys = np.full((row_end - row_start, width), NO_HIT, np.int64)
            for triangle in range(n_triangles):
                k = image * n_triangles + triangle
                if not drawable[k]:
                    continue
                y0 = max(lo[k, 1], row_start)
                y1 = min(lo[k, 1] + extent[k, 1], row_end)
                x0 = lo[k, 0]
                x1 = lo[k, 0] + extent[k, 0]
                for y in range(y0, y1):
                    py = np.float32(y) + half
                    for x in range(x0, x1):
                        px = np.float32(x) + half
                        inside = True
                        for edge in range(3):
                            if planes[k, edge, 0] * px + planes[k, edge, 1] * py + planes[k, edge, 2] < 0:
                                inside = False
                                break
                        if not inside:
                            continue
                        depth = planes[k, 3, 0] * px + planes[k, 3, 1] * py + planes[k, 3, 2]
                        if abs(depth) > one:
                            continue
                        quantised = np.int64((depth + one) * half * levels)
                        quantised = min(max(quantised, 0), DEPTH_LEVELS)
                        key = (quantised << 32) | triangle
                        if key < keys[y - row_start, x]:
                            keys[y - row_start, x] = key
            for y in range(row_start, row_end):
                for x in range(width):
                    key = keys[y - row_start, x]
                    if key != NO_HIT:
                        ids[image, y, x] = key & 0xFFFFFFFF
        return ids

    _kernel = kernel
    return kernel
