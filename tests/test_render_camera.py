"""Rotations, projections and clip space of facelab.render.camera."""

from __future__ import annotations

import math

import pytest
import torch

from facelab.render.camera import (
    PerspectiveCamera,
    WeakPerspectiveCamera,
    clip_to_pixels,
    euler_to_matrix,
    matrix_to_euler,
    matrix_to_rotation_6d,
    perspective,
    pixels_to_clip,
    pixels_to_ndc,
    rotation_6d_to_matrix,
    weak_perspective,
)

IDENTITY = torch.eye(3)[None]


def random_angles(count: int, seed: int = 0) -> torch.Tensor:
    """Angles strictly inside the principal range |pitch|, |roll| < pi, |yaw| < pi/2."""
    generator = torch.Generator().manual_seed(seed)
    unit = torch.rand(count, 3, generator=generator) * 2 - 1
    return unit * torch.tensor([math.pi, math.pi / 2, math.pi]) * 0.98


def test_euler_round_trip_recovers_angles_in_principal_range():
    angles = random_angles(1000)
    recovered = matrix_to_euler(euler_to_matrix(angles))
    torch.testing.assert_close(recovered, angles, atol=1e-5, rtol=0)


def test_euler_matrices_are_proper_rotations():
    rotation = euler_to_matrix(random_angles(500, seed=1))
    torch.testing.assert_close(rotation @ rotation.transpose(-1, -2), torch.eye(3).expand(500, 3, 3),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(500), atol=1e-6, rtol=0)


def test_euler_order_is_roll_after_yaw_after_pitch():
    pitch, yaw, roll = 0.3, -0.4, 0.7
    rotation = euler_to_matrix(torch.tensor([pitch, yaw, roll]))
    only = lambda p, y, r: euler_to_matrix(torch.tensor([p, y, r]))  # noqa: E731
    torch.testing.assert_close(rotation, only(0, 0, roll) @ only(0, yaw, 0) @ only(pitch, 0, 0))


@pytest.mark.parametrize(
    ("angles", "source", "target"),
    [
        ((0.0, 90.0, 0.0), (0, 0, 1), (1, 0, 0)),  # yaw +90: the face (+z) turns to the viewer's right (+x)
        ((90.0, 0.0, 0.0), (0, 0, 1), (0, -1, 0)),  # pitch +90: the face looks down
        ((0.0, 0.0, 90.0), (1, 0, 0), (0, 1, 0)),  # roll +90: +x turns to +y (counter-clockwise)
    ],
)
def test_positive_angles_turn_axes_by_the_right_hand_rule(angles, source, target):
    rotation = euler_to_matrix(torch.tensor([math.radians(a) for a in angles]))
    torch.testing.assert_close(rotation @ torch.tensor(source, dtype=torch.float32),
                               torch.tensor(target, dtype=torch.float32), atol=1e-6, rtol=0)


def test_rotation_6d_round_trip_and_gram_schmidt():
    rotation = euler_to_matrix(random_angles(200, seed=2))
    torch.testing.assert_close(rotation_6d_to_matrix(matrix_to_rotation_6d(rotation)), rotation, atol=1e-6, rtol=0)
    # Any non-degenerate 6D vector gives a proper rotation whose first column is along x[:3].
    raw = torch.randn(200, 6, generator=torch.Generator().manual_seed(3))
    made = rotation_6d_to_matrix(raw)
    torch.testing.assert_close(made @ made.transpose(-1, -2), torch.eye(3).expand(200, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(made), torch.ones(200), atol=1e-5, rtol=0)
    torch.testing.assert_close(made[..., 0], raw[:, :3] / raw[:, :3].norm(dim=-1, keepdim=True))


def test_rotation_6d_gradients_are_finite_and_match_finite_differences():
    raw = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert torch.autograd.gradcheck(rotation_6d_to_matrix, (raw,))
    single = raw.detach().float().requires_grad_()
    weights = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(5))
    (rotation_6d_to_matrix(single) * weights).sum().backward()
    assert torch.isfinite(single.grad).all() and single.grad.abs().sum() > 0


def pinhole(points, translation=(0.0, 0.0, -500.0), focal=1000.0, principal=(112.0, 112.0)):
    points = torch.tensor(points, dtype=torch.float32)[None]
    return perspective(points, IDENTITY, torch.tensor([translation]), torch.tensor([focal]),
                       torch.tensor([principal]))


def test_perspective_optical_axis_lands_on_principal_point():
    pixels, depth = pinhole([[0.0, 0.0, 0.0], [0.0, 0.0, 100.0]], principal=(100.0, 120.0))
    torch.testing.assert_close(pixels[0], torch.tensor([[100.0, 120.0], [100.0, 120.0]]))
    torch.testing.assert_close(depth[0], torch.tensor([500.0, 400.0]))  # +z is toward the camera


def test_perspective_ten_mm_right_at_500_mm_is_twenty_pixels_right():
    pixels, _ = pinhole([[10.0, 0.0, 0.0]])
    torch.testing.assert_close(pixels[0, 0], torch.tensor([132.0, 112.0]))


def test_model_up_is_image_up_for_both_cameras():
    up = [[0.0, 0.0, 0.0], [0.0, 10.0, 0.0]]
    pixels, _ = pinhole(up)
    assert pixels[0, 1, 1] < pixels[0, 0, 1]
    weak, _ = weak_perspective(torch.tensor([up]), IDENTITY, torch.tensor([2.0]), torch.tensor([[50.0, 60.0]]))
    assert weak[0, 1, 1] < weak[0, 0, 1]


def test_weak_perspective_scale_translation_and_depth_order():
    points = torch.tensor([[[0.0, 0.0, 0.0], [10.0, 5.0, 0.0], [0.0, 0.0, 30.0]]])
    pixels, depth = weak_perspective(points, IDENTITY, torch.tensor([2.0]), torch.tensor([[50.0, 60.0]]))
    torch.testing.assert_close(pixels[0], torch.tensor([[50.0, 60.0], [70.0, 50.0], [50.0, 60.0]]))
    torch.testing.assert_close(depth[0], torch.tensor([0.0, 0.0, -60.0]))  # the nearer point is smaller
    # With a yaw of 90 deg, +z (toward the camera) goes to +x: to the right in the image.
    yawed = euler_to_matrix(torch.tensor([[0.0, math.pi / 2, 0.0]]))
    pixels, depth = weak_perspective(points, yawed, torch.tensor([2.0]), torch.tensor([[50.0, 60.0]]))
    torch.testing.assert_close(pixels[0, 2], torch.tensor([110.0, 60.0]))
    torch.testing.assert_close(depth[0, 1], torch.tensor(20.0), atol=1e-5, rtol=0)  # +x went backward


def test_pixel_centres_of_corners_map_to_expected_ndc():
    height, width = 4, 8
    corners = torch.tensor([[[0.5, 0.5], [width - 0.5, 0.5], [0.5, height - 0.5], [width - 0.5, height - 0.5]]])
    expected = torch.tensor([[-1 + 1 / width, 1 - 1 / height], [1 - 1 / width, 1 - 1 / height],
                             [-1 + 1 / width, -1 + 1 / height], [1 - 1 / width, -1 + 1 / height]])
    torch.testing.assert_close(pixels_to_ndc(corners, (height, width))[0], expected)
    for is_perspective in (True, False):
        clip = pixels_to_clip(corners, torch.full((1, 4), 300.0), (height, width), 10.0, 1000.0, is_perspective)
        torch.testing.assert_close(clip[0, :, :2] / clip[0, :, 3:], expected)


@pytest.mark.parametrize("is_perspective", [True, False])
def test_clip_round_trips_to_pixels_and_depth_range(is_perspective):
    generator = torch.Generator().manual_seed(5)
    pixels = torch.rand(2, 50, 2, generator=generator) * torch.tensor([320.0, 240.0])
    depth = 100.0 + 800.0 * torch.rand(2, 50, generator=generator)
    clip = pixels_to_clip(pixels, depth, (240, 320), 50.0, 1000.0, is_perspective)
    torch.testing.assert_close(clip_to_pixels(clip, (240, 320)), pixels, atol=1e-4, rtol=0)
    ends = pixels_to_clip(torch.zeros(1, 2, 2), torch.tensor([[50.0, 1000.0]]), (240, 320), 50.0, 1000.0,
                          is_perspective)
    torch.testing.assert_close(ends[0, :, 2] / ends[0, :, 3], torch.tensor([-1.0, 1.0]))
    if is_perspective:
        torch.testing.assert_close(clip[..., 3], depth)  # w = depth: perspective-correct interpolation
        z_ndc = clip[..., 2] / clip[..., 3]
        order = depth.argsort(dim=-1)
        assert (z_ndc.gather(-1, order).diff(dim=-1) > 0).all()  # farther = larger z


def test_camera_dataclasses_match_functional_core():
    vertices = torch.randn(2, 10, 3) * 50
    rotation = euler_to_matrix(random_angles(2, seed=6) * 0.2)
    camera = PerspectiveCamera(rotation, torch.tensor([[0.0, 0.0, -600.0]] * 2), torch.tensor([900.0, 1100.0]),
                               torch.tensor([[112.0, 112.0]] * 2))
    pixels, _ = camera.project(vertices)
    torch.testing.assert_close(clip_to_pixels(camera.to_clip(vertices, (224, 224)), (224, 224)), pixels,
                               atol=1e-3, rtol=0)
    weak = WeakPerspectiveCamera(rotation, torch.tensor([1.5, 2.0]), torch.tensor([[112.0, 100.0]] * 2))
    clip = weak.to_clip(vertices, (224, 224))
    torch.testing.assert_close(clip_to_pixels(clip, (224, 224)), weak.project(vertices)[0], atol=1e-3, rtol=0)
    assert (clip[..., 2].abs() < 1).all()


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="focal"):
        perspective(torch.zeros(2, 5, 3), IDENTITY.expand(2, 3, 3), torch.zeros(2, 3), torch.ones(3),
                    torch.zeros(2, 2))
