"""MeshRenderer: shading, coverage and outputs on a simple scene."""

from __future__ import annotations

import torch

from facelab.render import MeshRenderer, vertex_normals
from facelab.render.lighting import DEFAULT_SH_DC


def quad(depth: float = 0.0):
    xy = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    clip = torch.cat([xy, torch.full((4, 1), depth), torch.ones(4, 1)], 1)[None]
    vertices = torch.cat([xy * 100, torch.zeros(4, 1)], 1)[None]  # facing +z, toward the viewer
    return clip, vertices, torch.tensor([[0, 1, 2], [0, 2, 3]])


def test_unit_irradiance_renders_the_albedo_and_alpha_is_the_coverage():
    clip, vertices, triangles = quad()
    sh = torch.zeros(1, 3, 9)
    sh[:, :, 0] = DEFAULT_SH_DC
    albedo = torch.tensor([0.6, 0.4, 0.2]).expand(1, 4, 3)
    out = MeshRenderer((32, 32), backend="torch", antialias=False, gamma=None)(clip, vertices, triangles, sh, albedo=albedo)
    inside = out.alpha[0, 0] > 0.5
    assert int(inside.sum()) == 16 * 16  # the quad spans half the image in each direction
    torch.testing.assert_close(out.image[0, :, inside].T, albedo[0, :1].expand(256, 3), atol=1e-4, rtol=0)
    assert float(out.image[0, :, ~inside].abs().max()) == 0.0
    torch.testing.assert_close(out.normals[0, :, inside].T, torch.tensor([[0.0, 0.0, 1.0]]).expand(256, 3))


def test_gamma_encodes_the_linear_image():
    clip, vertices, triangles = quad()
    sh = torch.zeros(1, 1, 9)
    sh[:, :, 0] = DEFAULT_SH_DC
    albedo = torch.full((1, 4, 3), 0.25)
    out = MeshRenderer((16, 16), backend="torch", antialias=False, gamma=2.2)(clip, vertices, triangles, sh, albedo=albedo)
    inside = out.alpha[0, 0] > 0.5
    torch.testing.assert_close(out.image[0, 0, inside], torch.full((64,), 0.25 ** (1 / 2.2)), atol=1e-4, rtol=0)


def test_vertex_normals_of_a_sphere_point_outwards():
    phi, theta = torch.meshgrid(torch.linspace(0.3, 2.8, 12), torch.linspace(0, 6.0, 16), indexing="ij")
    points = torch.stack([phi.sin() * theta.cos(), phi.sin() * theta.sin(), phi.cos()], -1).reshape(-1, 3)
    ids = torch.arange(12 * 16).reshape(12, 16)
    a, b, c, d = ids[:-1, :-1].reshape(-1), ids[:-1, 1:].reshape(-1), ids[1:, 1:].reshape(-1), ids[1:, :-1].reshape(-1)
    triangles = torch.cat([torch.stack([a, d, c], 1), torch.stack([a, c, b], 1)])
    normals = vertex_normals(points[None], triangles)[0]
    interior = ids[1:-1, 1:-1].reshape(-1)
    assert (normals[interior] * points[interior]).sum(-1).min() > 0.95


def test_compiled_vertex_normals_match_the_torch_reference_and_their_gradients(lite_model):
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        vertices = lite_model(torch.randn(2, lite_model.num_shape, generator=generator), None)
    weights = torch.randn(vertices.shape, generator=generator)
    results = []
    for kernels in ("torch", "numba"):
        leaf = vertices.clone().requires_grad_(True)
        normals = vertex_normals(leaf, lite_model.triangles, kernels)
        (normals * weights).sum().backward()
        results.append((normals.detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-4 * float(results[0][1].abs().max()), rtol=0)
