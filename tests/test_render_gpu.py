"""nvdiffrast against the torch backend on a GPU (marker `gpu`; skipped without CUDA + nvdiffrast)."""

from __future__ import annotations

import pytest
import torch

from facelab.render.backends import NvdiffrastRasterizer, TorchRasterizer, nvdiffrast_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not nvdiffrast_available(), reason="needs CUDA and nvdiffrast"),
]


@pytest.fixture(scope="module")
def scene(full_model):
    vertices = full_model.mean[None].repeat(4, 1, 1).cuda()
    vertices = vertices + 3.0 * torch.randn(4, 1, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    w = torch.ones_like(vertices[..., :1])
    pos = torch.cat([vertices[..., :2] / 130, (vertices[..., 2:3] - 100) / -200, w], -1)
    return pos.contiguous(), full_model.triangles.cuda(), full_model.mean.cuda()


def test_backends_agree_on_triangle_ids(scene):
    pos, tri, _ = scene
    reference = TorchRasterizer().rasterize(pos, tri, (224, 224))[..., 3]
    result = NvdiffrastRasterizer().rasterize(pos, tri, (224, 224))[..., 3]
    assert (reference == result).float().mean() >= 0.995


def test_backends_agree_on_interpolated_attributes(scene):
    pos, tri, attribute = scene
    torch_backend, nv_backend = TorchRasterizer(), NvdiffrastRasterizer()
    rast_t, rast_n = torch_backend.rasterize(pos, tri, (224, 224)), nv_backend.rasterize(pos, tri, (224, 224))
    same = (rast_t[..., 3] == rast_n[..., 3]) & (rast_t[..., 3] > 0)
    values_t = torch_backend.interpolate(attribute / 100, rast_t, tri)
    values_n = nv_backend.interpolate(attribute / 100, rast_n, tri)
    assert (values_t - values_n)[same].abs().max() < 1e-4


def test_backends_agree_on_vertex_gradients(scene):
    pos, tri, attribute = scene
    grads = []
    for backend in (TorchRasterizer(), NvdiffrastRasterizer()):
        positions = pos.clone().requires_grad_(True)
        rast = backend.rasterize(positions, tri, (224, 224))
        image = backend.interpolate(attribute / 100, rast, tri)
        image.square().sum().backward()
        grads.append(positions.grad)
    relative = (grads[0] - grads[1]).norm() / grads[1].norm()
    assert relative < 1e-3
