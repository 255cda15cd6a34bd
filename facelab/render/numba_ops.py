"""The torch backend's primitives compiled for the CPU: the same contract and results as
:mod:`facelab.render.rasterize`, forward and backward, as autograd Functions over numba loops
(:mod:`facelab.render.numba_kernels`).

The vectorised torch primitives stay the reference: tests hold these to them (the same triangle
per pixel bit for bit, values and gradients to float rounding). What changes is the cost: the
reference builds a graph of whole-image temporaries per call (tens of milliseconds per image at
224 px), these loops touch each covered pixel once per pass.

numba is a dependency of facelab, but everything here degrades to the reference when it does not
import (:func:`available`). The loops compile on first use (seconds) and are cached on disk next
to the module when that directory is writable.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from contextlib import contextmanager

import numpy as np
import torch

from .camera import ndc_to_pixels

_kernels = None
# numba's default threading layer here is GNU OpenMP, which aborts a forked child (a DataLoader
# worker) that runs a parallel loop after its parent did. The workqueue layer is fork-safe but
# must not be entered by two threads at once, hence the lock. NUMBA_THREADING_LAYER overrides.
_THREADING_LAYER = os.environ.get("NUMBA_THREADING_LAYER", "workqueue")
_LOCK = threading.RLock()


def available() -> bool:
    return importlib.util.find_spec("numba") is not None


def supports(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can take the compiled path: CPU, float32 or float64."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)


def visible_triangles(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """As ``rasterize.visible_triangles``: nearest triangle id per pixel (B,H,W) int64, -1 for
    background; pos (B,V,4) (visibility runs in float32, as the reference's), tri (T,3)."""
    with _compiled() as (kernels, threads):
        ids = kernels.zbuffer(_numpy(pos, np.float32), _numpy(tri, np.int64), height, width,
                              _bands(pos.shape[0], threads))
    return torch.from_numpy(ids)


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """As ``rasterize.rasterize`` (visibility in float32, barycentrics in the input dtype)."""
    return _Rasterize.apply(pos, tri.long(), tuple(resolution))


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """As ``rasterize.interpolate``; attr (B,V,C), (1,V,C) or (V,C)."""
    if attr.ndim == 2:
        attr = attr[None]
    return _Interpolate.apply(attr, rast, tri.long())


def antialias(color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """As ``rasterize.antialias``: gradients reach color and, through the silhouette edge
    positions, pos."""
    height, width = color.shape[1:3]
    screen = ndc_to_pixels(pos[..., :2] / pos[..., 3:4], (height, width))
    return _Antialias.apply(color, screen, rast, pos[..., 3].detach() > 1e-8, tri.long())


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """As ``renderer.vertex_normals``: area-weighted unit vertex normals (B,V,3)."""
    return _VertexNormals.apply(vertices, triangles.long())


class _VertexNormals(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vertices, triangles):
        values = vertices.detach().contiguous()
        raw, normals = torch.zeros_like(values), torch.zeros_like(values)
        with _compiled() as (kernels, _):
            kernels.vertex_normals_forward(values.numpy(), _numpy(triangles, np.int64), raw.numpy(), normals.numpy())
        ctx.save_for_backward(values, triangles, raw, normals)
        return normals

    @staticmethod
    def backward(ctx, grad_normals):
        values, triangles, raw, normals = ctx.saved_tensors
        grad = torch.zeros_like(values)
        with _compiled() as (kernels, _):
            kernels.vertex_normals_backward(values.numpy(), _numpy(triangles, np.int64), raw.numpy(), normals.numpy(),
                                            _numpy(grad_normals.to(values.dtype), None), grad.numpy())
        return grad, None


class _Rasterize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pos, tri, resolution):
        height, width = resolution
        ids = visible_triangles(pos.detach(), tri, height, width)
        rast = torch.empty(pos.shape[0], height, width, 4, dtype=pos.dtype)
        with _compiled() as (kernels, _):
            kernels.barycentrics_forward(_numpy(pos, None), _numpy(tri, np.int64), ids.numpy(), rast.numpy())
        ctx.save_for_backward(pos, tri, ids)
        return rast

    @staticmethod
    def backward(ctx, grad_rast):
        pos, tri, ids = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        with _compiled() as (kernels, threads):
            bands = _bands(pos.shape[0], threads)
            accumulator = np.zeros((pos.shape[0] * bands, pos.shape[1], 4), np.float64)
            kernels.barycentrics_backward(_numpy(pos, None), _numpy(tri, np.int64), ids.numpy(),
                                          _numpy(grad_rast, None), bands, accumulator)
        grad = accumulator.reshape(pos.shape[0], bands, pos.shape[1], 4).sum(axis=1)
        return torch.from_numpy(grad).to(pos.dtype), None, None


class _Interpolate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attr, rast, tri):
        batch, height, width, _ = rast.shape
        dtype = torch.promote_types(attr.dtype, rast.dtype)
        attr_values = attr.detach().to(dtype).contiguous()
        out = torch.empty(batch, height, width, attr.shape[-1], dtype=dtype)
        with _compiled() as (kernels, _):
            kernels.interpolate_forward(attr_values.numpy(), _numpy(rast, None), _numpy(tri, np.int64), out.numpy())
        ctx.save_for_backward(attr_values, rast, tri)
        ctx.attr_shape, ctx.attr_dtype = attr.shape, attr.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        attr, rast, tri = ctx.saved_tensors
        batch = rast.shape[0]
        grad_rast = torch.empty(rast.shape, dtype=attr.dtype)
        with _compiled() as (kernels, threads):
            bands = _bands(batch, threads)
            accumulator = np.zeros((batch * bands, attr.shape[1], attr.shape[2]), attr.numpy().dtype)
            kernels.interpolate_backward(attr.numpy(), _numpy(rast, None), _numpy(tri, np.int64),
                                         _numpy(grad_out.to(attr.dtype), None), bands, accumulator, grad_rast.numpy())
        grad_attr = torch.from_numpy(accumulator.reshape(batch, bands, *attr.shape[1:]).sum(axis=1))
        if ctx.attr_shape[0] == 1 and batch > 1:
            grad_attr = grad_attr.sum(0, keepdim=True)
        grad_attr = grad_attr.to(ctx.attr_dtype) if ctx.needs_input_grad[0] else None
        grad_rast = grad_rast.to(rast.dtype) if ctx.needs_input_grad[1] else None
        return grad_attr, grad_rast, None


class _Antialias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, color, screen, rast, valid, tri):
        from .rasterize import _edge_ids

        edge_of_corner, edge_count = _edge_ids(tri)
        screen_values = _numpy(screen, None)
        ids = (rast[..., 3].detach().long() - 1).numpy()
        depth = _numpy(rast[..., 2], None)
        color_values = color.detach().contiguous()
        out = color_values.clone()
        with _compiled() as (kernels, _):
            silhouette = kernels.silhouette_edges(screen_values, _numpy(valid, np.bool_), _numpy(tri, np.int64),
                                                  _numpy(edge_of_corner, np.int64), edge_count)
            state = (ids, depth, screen_values, _numpy(tri, np.int64), silhouette, silhouette.any(axis=-1))
            kernels.antialias_forward(color_values.numpy(), *state, out.numpy())
        ctx.state, ctx.color = state, color_values
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_values = grad_out.to(ctx.color.dtype).contiguous()
        grad_color = grad_values.clone()
        grad_screen = np.zeros(ctx.state[2].shape, np.float64)
        with _compiled() as (kernels, _):
            kernels.antialias_backward(ctx.color.numpy(), *ctx.state, grad_values.numpy(), grad_color.numpy(),
                                       grad_screen)
        return grad_color, torch.from_numpy(grad_screen).to(ctx.color.dtype), None, None, None


@contextmanager
def _compiled():
    """(kernels module, threads) with the lock held; numba sized to torch's thread count."""
    global _kernels
    with _LOCK:
        if _kernels is None:
            import numba

            numba.config.THREADING_LAYER = _THREADING_LAYER
            from . import numba_kernels

            _kernels = numba_kernels
        import numba

        threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
        yield _kernels, threads


def _bands(batch: int, threads: int) -> int:
    """Row bands per image so that small batches still use every thread."""
    return max(1, threads // batch) if batch < threads else 1


def _numpy(tensor: torch.Tensor, dtype) -> np.ndarray:
    array = tensor.detach().cpu().numpy()
    return np.ascontiguousarray(array if dtype is None else array.astype(dtype, copy=False))
