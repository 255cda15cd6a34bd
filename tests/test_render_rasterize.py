"""The torch rasterizer backend against analytic cases and finite differences."""

from __future__ import annotations

import pytest
import torch

from facelab.render.rasterize import _silhouette_edges, antialias, interpolate, rasterize, texture, visible_triangles
from facelab.render.numba_ops import available as numba_available

KERNELS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(not numba_available(), reason="numba missing"))]


def clip(points_xy_ndc, depth=0.0, w=1.0):
    points = torch.as_tensor(points_xy_ndc, dtype=torch.float32)
    count = len(points)
    return torch.cat([points * w, torch.full((count, 1), depth * w), torch.full((count, 1), w)], 1)[None]


@pytest.mark.parametrize("kernels", KERNELS)
def test_covered_pixel_count_matches_triangle_area(kernels):
    height, width = 96, 128
    corners = torch.tensor([[-0.71, -0.63], [0.83, -0.21], [-0.12, 0.77]])
    rast = rasterize(clip(corners), torch.tensor([[0, 1, 2]]), (height, width), kernels)
    pixels = torch.stack([(corners[:, 0] + 1) * width / 2, (1 - corners[:, 1]) * height / 2], 1)
    edge_a, edge_b = pixels[1] - pixels[0], pixels[2] - pixels[0]
    area = 0.5 * abs(float(edge_a[0] * edge_b[1] - edge_a[1] * edge_b[0]))
    covered = int((rast[..., 3] > 0).sum())
    assert abs(covered - area) < 0.01 * area, (covered, area)


@pytest.mark.parametrize("kernels", KERNELS)
def test_nearer_of_two_overlapping_triangles_wins_in_either_order(kernels):
    far = clip([[-1, -1], [1, -1], [0, 1]], depth=0.5)
    near = clip([[-1, -1], [1, -1], [0, 1]], depth=-0.5)
    for pos, expected in [(torch.cat([far, near], 1), 2), (torch.cat([near, far], 1), 1)]:
        rast = rasterize(pos, torch.tensor([[0, 1, 2], [3, 4, 5]]), (32, 32), kernels)
        ids = rast[..., 3][rast[..., 3] > 0]
        assert ids.numel() > 0 and bool((ids == expected).all())


def test_image_row_zero_is_the_top():
    pos = clip([[-1, 0.5], [1, 0.5], [0, 1]])  # a triangle in the upper part of ndc space
    rast = rasterize(pos, torch.tensor([[0, 1, 2]]), (40, 40))
    rows = torch.nonzero(rast[0, ..., 3] > 0)[:, 0]
    assert rows.max() < 10


def test_interpolation_reproduces_linear_attributes_under_perspective():
    # a tilted triangle in camera space (OpenGL camera at the origin looking down -z)
    vertices = torch.tensor([[-40.0, -30.0, -300.0], [50.0, -20.0, -420.0], [0.0, 45.0, -350.0]])
    focal, size = 500.0, 64
    w = -vertices[:, 2]
    pos = torch.stack([vertices[:, 0] * focal / (size / 2), vertices[:, 1] * focal / (size / 2),
                       torch.zeros(3), w], 1)[None]
    coefficients = torch.tensor([0.3, -0.2, 0.05])
    attribute = (vertices @ coefficients + 7.0)[:, None]
    rast = rasterize(pos, torch.tensor([[0, 1, 2]]), (size, size))
    values = interpolate(attribute, rast, torch.tensor([[0, 1, 2]]))[0, ..., 0]
    hit = rast[0, ..., 3] > 0
    rows, cols = torch.nonzero(hit, as_tuple=True)
    # the 3D point seen through each pixel centre: the ray hits the triangle's plane
    ndc_x = (cols + 0.5) / (size / 2) - 1
    ndc_y = 1 - (rows + 0.5) / (size / 2)
    directions = torch.stack([ndc_x * (size / 2) / focal, ndc_y * (size / 2) / focal, -torch.ones_like(ndc_x)], 1)
    normal = torch.linalg.cross(vertices[1] - vertices[0], vertices[2] - vertices[0])
    distance = (normal @ vertices[0]) / (directions @ normal)
    expected = (directions * distance[:, None]) @ coefficients + 7.0
    torch.testing.assert_close(values[hit], expected, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("kernels", KERNELS)
def test_interpolate_passes_gradcheck(kernels):
    pos = clip([[-0.8, -0.7], [0.9, -0.6], [0.1, 0.8]]).double()
    pos[..., 3] = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    pos[..., :2] *= pos[..., 3:4]
    tri = torch.tensor([[0, 1, 2]])
    attribute = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    pos.requires_grad_(True)

    def render(attr, positions):
        return interpolate(attr, rasterize(positions, tri, (6, 7), kernels), tri, kernels)

    assert torch.autograd.gradcheck(render, (attribute, pos), eps=1e-6, atol=1e-6)


def _silhouette_scene(vertex_x: torch.Tensor, kernels: str):
    """A quad over a coloured background plane; vertex 0's x is the free variable."""
    quad = torch.stack([
        torch.stack([vertex_x, torch.tensor(-0.55)]), torch.tensor([0.6, -0.5]),
        torch.tensor([0.55, 0.62]), torch.tensor([-0.58, 0.5])])
    back = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    xy = torch.cat([quad, back])
    pos = torch.cat([xy, torch.tensor([[-0.5]] * 4 + [[0.5]] * 4), torch.ones(8, 1)], 1)[None]
    tri = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    colours = torch.tensor([[1.0, 0.2, 0.1], [0.9, 0.8, 0.1], [0.1, 0.9, 0.3], [0.3, 0.2, 0.9]] + [[0.05, 0.1, 0.2]] * 4)
    rast = rasterize(pos, tri, (48, 48), kernels)
    return antialias(interpolate(colours, rast, tri, kernels), rast, pos, tri, kernels)


@pytest.mark.parametrize("kernels", KERNELS)
def test_silhouette_gradients_match_finite_differences(kernels):
    weights = torch.rand(1, 48, 48, 3, generator=torch.Generator().manual_seed(0))
    x = torch.tensor(-0.6, requires_grad=True)
    (_silhouette_scene(x, kernels) * weights).sum().backward()
    step = 2e-3  # under a tenth of a pixel
    with torch.no_grad():
        plus = (_silhouette_scene(x + step, kernels) * weights).sum()
        minus = (_silhouette_scene(x - step, kernels) * weights).sum()
    numeric = (plus - minus) / (2 * step)
    assert abs(float(x.grad) - float(numeric)) <= 0.05 * abs(float(numeric)), (float(x.grad), float(numeric))
    assert abs(float(numeric)) > 1.0  # the silhouette does move the image


def test_texture_samples_bilinearly_with_v_up():
    tex = torch.tensor([[[[0.0], [1.0]], [[2.0], [3.0]]]])  # row 0 is v = 1 (top)
    uv = torch.tensor([[[[0.25, 0.75], [0.75, 0.25], [0.5, 0.5]]]])
    values = texture(tex, uv)[0, 0, :, 0]
    torch.testing.assert_close(values, torch.tensor([0.0, 3.0, 1.5]))


def _posed_faces(model, batch=3, size=96, seed=3):
    from facelab.render.camera import PerspectiveCamera, euler_to_matrix

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vertices = model(torch.randn(batch, model.num_shape, generator=generator), None)
    camera = PerspectiveCamera(euler_to_matrix(torch.randn(batch, 3, generator=generator) * 0.4),
                               torch.tensor([[0.0, 0.0, -600.0]]).expand(batch, 3), torch.full((batch,), 200.0),
                               torch.full((batch, 2), size / 2))
    return camera.to_clip(vertices, (size, size)), model.triangles.long()


@pytest.mark.skipif(not numba_available(), reason="numba missing")
def test_numba_visibility_equals_the_torch_reference_on_posed_faces(lite_model):
    size = 96
    pos, triangles = _posed_faces(lite_model, size=size)
    reference = visible_triangles(pos, triangles, size, size, "torch")
    compiled = visible_triangles(pos, triangles, size, size, "numba")
    assert (reference >= 0).float().mean() > 0.2  # the faces fill a good part of the frame
    assert torch.equal(reference, compiled), f"{int((reference != compiled).sum())} pixels differ"


@pytest.mark.skipif(not numba_available(), reason="numba missing")
@pytest.mark.parametrize("batch", [1, 3])  # one image runs in row bands, several one image a thread
def test_numba_primitives_match_the_torch_reference_forward_and_backward(lite_model, batch):
    size = 64
    pos, triangles = _posed_faces(lite_model, batch=batch, size=size, seed=5)
    generator = torch.Generator().manual_seed(1)
    attributes = torch.rand(batch, pos.shape[1], 3, generator=generator)
    weights = torch.rand(batch, size, size, 3, generator=generator)
    results = {}
    for kernels in ("torch", "numba"):
        leaves = pos.clone().requires_grad_(True), attributes.clone().requires_grad_(True)
        rast = rasterize(leaves[0], triangles, (size, size), kernels)
        color = interpolate(leaves[1], rast, triangles, kernels)
        image = antialias(color, rast, leaves[0], triangles, kernels)
        (image * weights).sum().backward()
        results[kernels] = rast.detach(), image.detach(), leaves[0].grad, leaves[1].grad
    for name, reference, compiled in zip(["rast", "image", "d/dpos", "d/dattr"], results["torch"], results["numba"]):
        scale = float(reference.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(compiled, reference, rtol=0, atol=2e-4 * scale, msg=name)


def test_unknown_kernels_is_a_clear_error():
    with pytest.raises(ValueError, match="valid: auto, torch, numba"):
        rasterize(clip([[-1, -1], [1, -1], [0, 1]]), torch.tensor([[0, 1, 2]]), (8, 8), "cuda")


def _cube():
    corners = torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)])
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    triangles = torch.tensor([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    return corners, triangles


def test_silhouette_edges_are_the_outline_of_a_closed_surface():
    corners, triangles = _cube()
    # a generic view: three faces visible, the outline a hexagon of six cube edges
    rotation = torch.tensor([[0.7071, 0.0, 0.7071], [0.4082, 0.8165, -0.4082], [-0.5774, 0.4082, 0.5774]])
    screen = (corners @ rotation.T)[None, :, :2] * 20 + 50
    flags = _silhouette_edges(screen, torch.ones(1, 8, dtype=torch.bool), triangles)[0]
    edges = {tuple(sorted((int(tri[k]), int(tri[(k + 1) % 3])))) for tri, row in zip(triangles, flags)
             for k in range(3) if row[k]}
    assert len(edges) == 6
    # every silhouette edge is a cube edge (not a face diagonal) between a face turned toward the
    # viewer and one turned away; the outward normals of its two faces lie along the shared axes
    toward_viewer = rotation[2]  # the view direction in cube coordinates
    for a, b in edges:
        shared = torch.nonzero(corners[a] == corners[b]).flatten()
        assert len(shared) == 2
        facing = [float(toward_viewer[axis] * corners[a][axis]) > 0 for axis in shared]
        assert facing[0] != facing[1]


def test_interior_edges_of_a_flat_quad_are_not_silhouettes():
    screen = torch.tensor([[[10.0, 10.0], [30.0, 10.0], [30.0, 30.0], [10.0, 30.0]]])
    flags = _silhouette_edges(screen, torch.ones(1, 4, dtype=torch.bool), torch.tensor([[0, 1, 2], [0, 2, 3]]))[0]
    # edge k joins corners k and k+1: the shared diagonal (2,0) of the first and (0,2) of the second
    assert flags.tolist() == [[True, True, False], [False, True, True]]
