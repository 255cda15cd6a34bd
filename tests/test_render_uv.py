"""UV unwrapping and texture sampling: round trips on the face model, occlusion, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facelab.render import MeshRenderer
from facelab.render.camera import PerspectiveCamera, euler_to_matrix
from facelab.render.lighting import DEFAULT_SH_DC
from facelab.render.rasterize import interpolate
from facelab.render.uv import dilate_texture, sample_at_vertices, sample_texture, unwrap, uv_rasterize

IMAGE_SIZE = (128, 128)


def face_clip(model, yaw_degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean face 600 mm from a pinhole camera, turned by `yaw_degrees`: (vertices, clip)."""
    vertices = model()
    camera = PerspectiveCamera(euler_to_matrix(torch.tensor([[0.0, math.radians(yaw_degrees), 0.0]])),
                               torch.tensor([[0.0, 20.0, -600.0]]), torch.tensor([250.0]),
                               torch.tensor([[IMAGE_SIZE[1] / 2, IMAGE_SIZE[0] / 2]]))
    return vertices, camera.to_clip(vertices, IMAGE_SIZE)


def smooth_albedo(vertices: torch.Tensor) -> torch.Tensor:
    """(1,V,3) colours in [0.2, 0.8] varying over a few centimetres of the face."""
    x, y, z = vertices[0].unbind(-1)
    return torch.stack([0.5 + 0.3 * torch.sin(x / 14) * torch.cos(y / 19), 0.5 + 0.3 * torch.cos(x / 23 + y / 17),
                        0.5 + 0.25 * torch.sin(z / 11 + y / 29)], -1)[None]


def two_quads():
    """A near quad (ndc x in [-0.6, 0.2]) in front of a far one (x in [-0.2, 0.6]), both facing the
    camera; the near one owns u in [0, 0.5] of the UV map, the far one u in [0.5, 1]."""
    corners = torch.tensor([[0.0, -0.5], [0.8, -0.5], [0.8, 0.5], [0.0, 0.5]])
    near = torch.cat([corners + torch.tensor([-0.6, 0.0]), torch.full((4, 1), -0.5), torch.ones(4, 1)], 1)
    far = torch.cat([corners + torch.tensor([-0.2, 0.0]), torch.full((4, 1), 0.5), torch.ones(4, 1)], 1)
    clip = torch.cat([near, far])[None]
    triangles = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    square = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]])
    uv = torch.cat([square, square + torch.tensor([0.5, 0.0])])
    return clip, triangles, uv, triangles.clone()


def linear_image(height: int, width: int) -> torch.Tensor:
    """(1,2,H,W): channel 0 = ndc x, channel 1 = ndc y at each pixel centre."""
    x = (torch.arange(width) + 0.5) / width * 2 - 1
    y = 1 - (torch.arange(height) + 0.5) / height * 2
    return torch.stack([x[None, :].expand(height, width), y[:, None].expand(height, width)])[None]


def test_unwrap_then_rerender_reproduces_the_visible_face(lite_model):
    vertices, clip = face_clip(lite_model, yaw_degrees=15.0)
    triangles, uv, uv_triangles = lite_model.triangles, lite_model.uv, lite_model.uv_triangles
    sh = torch.zeros(1, 3, 9)
    sh[:, :, 0] = DEFAULT_SH_DC  # unit irradiance: the image is the albedo
    renderer = MeshRenderer(IMAGE_SIZE, backend="torch", antialias=False, gamma=None)
    source = renderer(clip, vertices, triangles, sh, albedo=smooth_albedo(vertices))

    texture, mask = unwrap(source.image, clip, triangles, uv, uv_triangles, (512, 512), image_rast=source.rast)
    filled, _ = dilate_texture(texture, mask, texels=2)  # UV seams and occlusion edges
    rerendered = renderer(clip, vertices, triangles, sh, texture=filled, uv=uv, uv_triangles=uv_triangles)

    interior = (-F.max_pool2d(-source.alpha, 5, stride=1, padding=2) > 0.5)[:, 0]  # alpha eroded by 2 px
    error = (rerendered.image - source.image).abs().amax(dim=1)[interior]
    # observed (yaw 15, 512 texels): mean 0.0009, 99th percentile 0.0073, 0.03 % of pixels above 0.05
    assert float(error.mean()) < 0.003
    assert float(error.quantile(0.99)) < 0.02
    assert float((error > 0.05).float().mean()) < 0.005
    # nearly every interior pixel reads four unwrapped (not dilated) texels: observed 99.8 %
    unwrapped = sample_texture(mask, source.rast, uv, uv_triangles)[..., 0] > 0.999
    assert float(unwrapped[interior].float().mean()) > 0.99
    # sample_texture is MeshRenderer's texture path (at unit irradiance)
    covered = source.rast[..., 3] > 0
    torch.testing.assert_close(sample_texture(filled, source.rast, uv, uv_triangles)[covered],
                               rerendered.image.permute(0, 2, 3, 1)[covered], atol=1e-5, rtol=0)


def test_far_cheek_of_a_turned_head_is_not_unwrapped(lite_model):
    vertices, clip = face_clip(lite_model, yaw_degrees=60.0)  # positive yaw turns the +x side away
    image = torch.rand(1, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    size = (256, 256)
    uv_rast = uv_rasterize(lite_model.uv, lite_model.uv_triangles, size)
    surface = interpolate(vertices, uv_rast, lite_model.triangles)[0]  # model-space point of each texel
    on_mesh = uv_rast[0, ..., 3] > 0
    far_cheek = on_mesh & (surface[..., 0] > 40) & (surface[..., 2] > 40)
    near_cheek = on_mesh & (surface[..., 0] < -40) & (surface[..., 2] > 40)
    for cull_backfaces in (True, False):  # hidden by facing away, and also by depth alone
        _, mask = unwrap(image, clip, lite_model.triangles, lite_model.uv, lite_model.uv_triangles, size,
                         cull_backfaces=cull_backfaces)
        # observed: far 0.0006 (culling) / 0.014 (depth only), near 0.998
        assert float(mask[0, ..., 0][far_cheek].mean()) < 0.05
        assert float(mask[0, ..., 0][near_cheek].mean()) > 0.98


def test_occluded_quad_is_masked_and_visible_texels_carry_the_image_colour():
    clip, triangles, uv, uv_triangles = two_quads()
    image = linear_image(64, 64)
    texture, mask = unwrap(image, clip, triangles, uv, uv_triangles, (64, 64))
    uv_rast = uv_rasterize(uv, uv_triangles, (64, 64))
    surface_x = interpolate(clip[..., :1], uv_rast, triangles)[0, ..., 0]  # ndc x of each texel's point
    on_near, on_far = (uv_rast[0, ..., 3] > 0) & (uv_rast[0, ..., 3] <= 2), uv_rast[0, ..., 3] > 2
    visible = mask[0, ..., 0] > 0
    half_pixel = 1 / 64
    assert not visible[on_far & (surface_x < 0.2 - 2 * half_pixel)].any()  # behind the near quad
    assert visible[on_far & (surface_x > 0.2 + 2 * half_pixel)].all()
    assert visible[on_near].all()  # the near quad is in full view
    # a linear image is sampled exactly: each visible texel holds the ndc position of its point
    surface = interpolate(clip[..., :2], uv_rast, triangles)[0]
    torch.testing.assert_close(texture[0][visible], surface[visible], atol=1e-5, rtol=0)
    assert float(texture[0][~visible].abs().max()) == 0.0


def test_gradients_reach_visible_image_pixels_only_and_the_geometry():
    clip, triangles, uv, uv_triangles = two_quads()
    clip.requires_grad_(True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    texture, _ = unwrap(image, clip, triangles, uv, uv_triangles, (64, 64))
    texture.sum().backward()
    covered = torch.zeros(64, 64, dtype=torch.bool)
    covered[16:48, 13:51] = True  # pixel centres in ndc y [-0.5, 0.5], x [-0.6, 0.6] (both quads)
    interior = -F.max_pool2d(-covered[None].float(), 3, stride=1, padding=1)[0] > 0
    grown = F.max_pool2d(covered[None].float(), 3, stride=1, padding=1)[0] > 0
    pixel_grad = image.grad[0].abs().sum(0)
    assert bool((pixel_grad[interior] > 0).all())
    assert float(pixel_grad[~grown].abs().max()) == 0.0
    assert bool(torch.isfinite(clip.grad).all()) and float(clip.grad[..., :2].abs().sum()) > 0


def linear_in_uv(uv: torch.Tensor) -> torch.Tensor:
    return torch.stack([uv[..., 0], uv[..., 1], 0.3 + 0.5 * uv[..., 0] - 0.2 * uv[..., 1]], -1)


def test_sample_at_vertices_returns_a_linear_function_of_uv():
    size = 64
    u = ((torch.arange(size) + 0.5) / size)[None, :].expand(size, size)
    v = (1 - (torch.arange(size) + 0.5) / size)[:, None].expand(size, size)  # row 0 at v = 1
    texture = linear_in_uv(torch.stack([u, v], -1))[None]
    # bilinear lookups reproduce a linear function exactly between the outermost texel centres
    points = 0.5 / size + (1 - 1 / size) * torch.rand(200, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sample_at_vertices(texture, points), linear_in_uv(points)[None], atol=1e-5, rtol=0)


def test_bad_shapes_are_named_in_the_error():
    clip, triangles, uv, uv_triangles = two_quads()
    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"image must have shape \(B,C,H,W\), got \(3, 32, 32\)"):
        unwrap(image[0], clip, triangles, uv, uv_triangles, (16, 16))
    with pytest.raises(ValueError, match=r"clip must have shape \(1,V,4\), got \(2, 8, 4\)"):
        unwrap(image, clip.expand(2, -1, -1), triangles, uv, uv_triangles, (16, 16))
    with pytest.raises(ValueError, match=r"uv_triangles must have shape \(4,3\), got \(3, 3\)"):
        unwrap(image, clip, triangles, uv, uv_triangles[:3], (16, 16))
    with pytest.raises(ValueError, match=r"uv must have shape \(1,Vt,2\), got \(2, 5, 2\)"):
        sample_at_vertices(torch.rand(1, 8, 8, 3), torch.rand(2, 5, 2))
