"""Rasterizer backends behind one contract (nvdiffrast's): ``rasterize``, ``interpolate``,
``texture``, ``antialias``. ``get_rasterizer("auto")`` picks nvdiffrast when CUDA and the
package are available, the pure-PyTorch backend otherwise.

Both backends return images with row 0 at the top and take textures with row 0 at v = 1;
nvdiffrast's own outputs (row 0 at the bottom) are flipped at this boundary.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch

from . import rasterize as torch_ops

BACKENDS = ("auto", "torch", "nvdiffrast")


class Rasterizer(Protocol):
    name: str

    def rasterize(self, pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor: ...

    def interpolate(self, attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor: ...

    def texture(self, tex: torch.Tensor, uv: torch.Tensor) -> torch.Tensor: ...

    def antialias(self, color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor) -> torch.Tensor: ...


class TorchRasterizer:
    """Pure PyTorch, any device (see ``facelab.render.rasterize``)."""

    name = "torch"

    def __init__(self, kernels: str = "auto"):
        if kernels not in torch_ops.KERNELS:
            raise ValueError(f"unknown kernels {kernels!r}; valid: {', '.join(torch_ops.KERNELS)}")
        self.kernels = kernels

    def rasterize(self, pos, tri, resolution):
        return torch_ops.rasterize(pos, tri, resolution, self.kernels)

    def interpolate(self, attr, rast, tri):
        return torch_ops.interpolate(attr, rast, tri, self.kernels)

    def texture(self, tex, uv):
        return torch_ops.texture(tex, uv)

    def antialias(self, color, rast, pos, tri):
        return torch_ops.antialias(color, rast, pos, tri, self.kernels)


class NvdiffrastRasterizer:
    """NVIDIA nvdiffrast (CUDA; NVIDIA Source Code License, non-commercial): an optional extra."""

    name = "nvdiffrast"

    def __init__(self, device: torch.device | str = "cuda"):
        import nvdiffrast.torch as dr  # checked by get_rasterizer

        self._dr = dr
        self._context = dr.RasterizeCudaContext(device=torch.device(device))

    def rasterize(self, pos, tri, resolution):
        rast, _ = self._dr.rasterize(self._context, pos.float().contiguous(), tri.int().contiguous(),
                                     resolution=list(resolution))
        return rast.flip(1)

    def interpolate(self, attr, rast, tri):
        if attr.ndim == 3 and attr.shape[0] == 1 and rast.shape[0] > 1:
            attr = attr[0]
        out, _ = self._dr.interpolate(attr.float().contiguous(), rast.contiguous(), tri.int().contiguous())
        return out

    def texture(self, tex, uv):
        # nvdiffrast reads texel row 0 at v = 0; facelab's UV images keep row 0 at v = 1
        return self._dr.texture(tex.flip(1).float().contiguous(), uv.float().contiguous(), filter_mode="linear")

    def antialias(self, color, rast, pos, tri):
        out = self._dr.antialias(color.flip(1).float().contiguous(), rast.flip(1).contiguous(),
                                 pos.float().contiguous(), tri.int().contiguous())
        return out.flip(1)


def nvdiffrast_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("nvdiffrast") is not None


def get_rasterizer(backend: str = "auto", device: torch.device | str | None = None,
                   kernels: str = "auto") -> Rasterizer:
    """The rasterizer for `backend` ("auto", "torch" or "nvdiffrast") on `device`; `kernels`
    picks the torch backend's implementation: "numba" (compiled, CPU), "torch" (vectorised,
    any device) or "auto" (see ``facelab.render.rasterize.rasterize``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown renderer backend {backend!r}; valid: {', '.join(BACKENDS)}")
    device = torch.device(device) if device is not None else None
    on_cuda = device is None or device.type == "cuda"
    if backend == "auto":
        backend = "nvdiffrast" if on_cuda and nvdiffrast_available() else "torch"
    if backend == "torch":
        return TorchRasterizer(kernels)
    if not torch.cuda.is_available():
        raise RuntimeError("renderer=nvdiffrast needs a CUDA device; use renderer=torch (or auto) on this machine")
    if importlib.util.find_spec("nvdiffrast") is None:
        raise RuntimeError("renderer=nvdiffrast: the nvdiffrast package is not installed. Install it into "
                           "this environment from NVlabs' source release (see README, 'GPU rendering'), "
                           "or use renderer=torch")
    return NvdiffrastRasterizer(device or "cuda")
