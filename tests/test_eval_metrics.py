"""Evaluation metrics: Umeyama alignment, aligned vertex error and landmark NME."""

from __future__ import annotations

import math

import pytest
import torch

from facelab.eval.metrics import (YAW_BINS, albedo_error, aligned_vertex_error, apply_similarity, landmark_error,
                                  lighting_error, mask_iou, nme_aflw2000, nme_by_yaw, photometric_error,
                                  similarity_transform, sphere_directions)


def random_rotation(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(B,3,3) proper rotations from the QR of a Gaussian matrix."""
    q, r = torch.linalg.qr(torch.randn(batch, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None]
    q[:, :, 0] *= torch.sign(torch.linalg.det(q))[:, None]
    return q


def transformed_pair(batch: int = 4, count: int = 50, scale: float = 1.3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, count, 3, generator=generator, dtype=torch.float64) * 40.0
    rotation = random_rotation(batch, generator)
    translation = torch.randn(batch, 3, generator=generator, dtype=torch.float64) * 100.0
    s = torch.full((batch,), scale, dtype=torch.float64)
    target = apply_similarity(source, s, rotation, translation)
    return source.float(), target.float(), s, rotation, translation


def test_similarity_transform_recovers_a_random_similarity():
    source, target, s, rotation, translation = transformed_pair()
    got_s, got_r, got_t = similarity_transform(source, target)
    assert got_s.dtype == got_r.dtype == got_t.dtype == torch.float32
    assert got_s.shape == (4,) and got_r.shape == (4, 3, 3) and got_t.shape == (4, 3)
    torch.testing.assert_close(got_s.double(), s, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_r.double(), rotation, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_t.double(), translation, atol=1e-5 * 100.0, rtol=1e-5)
    torch.testing.assert_close(apply_similarity(source, got_s, got_r, got_t), target, atol=1e-3, rtol=0)


def test_rotation_is_proper_even_when_the_data_is_a_mirror_image():
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(3, 30, 3, generator=generator)
    target = source * torch.tensor([-1.0, 1.0, 1.0])  # a reflection: the best orthogonal fit has det -1
    _, rotation, _ = similarity_transform(source, target)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-5, rtol=0)


def test_rigid_fit_keeps_scale_at_one_and_recovers_the_rotation():
    source, target, _, rotation, _ = transformed_pair(scale=1.3)
    got_s, got_r, _ = similarity_transform(source, target, scale=False)
    torch.testing.assert_close(got_s, torch.ones(4))
    torch.testing.assert_close(got_r.double(), rotation, atol=1e-5, rtol=0)


def test_zero_weights_on_outliers_make_the_fit_exact():
    source, target, s, rotation, translation = transformed_pair(count=40)
    corrupted = target.clone()
    corrupted[:, :5] += 500.0  # gross outliers
    weights = torch.ones(40)
    weights[:5] = 0.0
    got_s, got_r, _ = similarity_transform(source, corrupted, weights)
    torch.testing.assert_close(got_s.double(), s, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_r.double(), rotation, atol=1e-5, rtol=0)
    unweighted, _, _ = similarity_transform(source, corrupted)
    assert (unweighted.double() - s).abs().max() > 1e-2  # the outliers do matter without weights
    error = aligned_vertex_error(source, corrupted, weights=weights)
    assert error.max() < 1e-3
    assert aligned_vertex_error(source, corrupted).min() > 1.0


def test_aligned_vertex_error_is_zero_for_a_transformed_copy_only_after_alignment():
    source, target, *_ = transformed_pair()
    assert aligned_vertex_error(source, target, align="similarity").max() < 1e-3
    assert aligned_vertex_error(source, target, align="none").min() > 1.0
    assert aligned_vertex_error(source, target, align="rigid").min() > 1.0  # rigid cannot undo the 1.3 scale


def test_known_per_vertex_offset_gives_that_error_without_alignment():
    target = torch.randn(2, 10, 3)
    offset = torch.tensor([3.0, 0.0, 4.0])  # 5 mm
    error = aligned_vertex_error(target + offset, target, align="none")
    torch.testing.assert_close(error, torch.full((2,), 5.0))
    weights = torch.zeros(10)
    weights[:4] = 1.0
    shifted = target.clone()
    shifted[:, :4] += offset
    shifted[:, 4:] += 100.0  # excluded vertices do not count
    torch.testing.assert_close(aligned_vertex_error(shifted, target, align="none", weights=weights), torch.full((2,), 5.0))


def test_aligned_vertex_error_is_differentiable():
    source, target, *_ = transformed_pair(batch=2, count=20)
    predicted = (source + 0.1 * torch.randn_like(source)).requires_grad_()
    aligned_vertex_error(predicted, target).sum().backward()
    assert predicted.grad is not None and torch.isfinite(predicted.grad).all()


def test_landmark_error_on_a_known_shift_equals_the_shift():
    target = torch.rand(3, 68, 2) * 200.0
    predicted = target + torch.tensor([6.0, 8.0])  # 10 px
    torch.testing.assert_close(landmark_error(predicted, target), torch.full((3,), 10.0))
    confidence = torch.ones(3, 68)
    confidence[:, 0] = 0.0
    predicted[:, 0] += 1000.0  # an occluded point with zero confidence
    torch.testing.assert_close(landmark_error(predicted, target, confidence=confidence), torch.full((3,), 10.0))


def test_interocular_normalisation_divides_by_the_outer_eye_corner_distance():
    target = torch.rand(2, 68, 2) * 200.0
    target[:, 36] = torch.tensor([50.0, 100.0])
    target[:, 45] = torch.tensor([110.0, 180.0])  # 100 px apart
    predicted = target + torch.tensor([3.0, 4.0])  # 5 px
    torch.testing.assert_close(landmark_error(predicted, target, normalize="interocular"), torch.full((2,), 0.05))


def test_bbox_normalisation_divides_by_the_square_root_of_the_box_area():
    target = torch.tensor([[[0.0, 0.0], [40.0, 10.0], [20.0, 5.0]]])  # box 40 x 10 -> sqrt 20
    predicted = target + torch.tensor([0.0, 2.0])
    torch.testing.assert_close(landmark_error(predicted, target, normalize="bbox"), torch.tensor([0.1]))


@pytest.mark.parametrize("call, message", [
    (lambda: aligned_vertex_error(torch.zeros(1, 5, 3), torch.zeros(1, 5, 3), align="affine"), "similarity, rigid, none"),
    (lambda: landmark_error(torch.zeros(1, 68, 2), torch.zeros(1, 68, 2), normalize="iod"), "none, interocular, bbox"),
    (lambda: similarity_transform(torch.zeros(5, 3), torch.zeros(5, 3)), "(B,N,3)"),
    (lambda: similarity_transform(torch.zeros(1, 5, 3), torch.zeros(1, 6, 3)), "same shape"),
    (lambda: similarity_transform(torch.rand(1, 5, 3), torch.rand(1, 5, 3), torch.ones(4)), "(5,) or (1, 5)"),
    (lambda: similarity_transform(torch.rand(1, 5, 3), torch.rand(1, 5, 3), -torch.ones(5)), "non-negative"),
    (lambda: landmark_error(torch.zeros(1, 5, 2), torch.zeros(1, 5, 2), normalize="interocular"), "68-point"),
    (lambda: landmark_error(torch.zeros(1, 5, 3), torch.zeros(1, 5, 3)), "[..., :2]"),
])
def test_bad_shapes_and_unknown_modes_raise_value_error_saying_what_to_do(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


def test_float64_inputs_stay_float64_and_scale_matches_known_value():
    source, target, *_ = transformed_pair(batch=1, scale=0.5)
    s, rotation, _ = similarity_transform(source.double(), target.double())
    assert s.dtype == rotation.dtype == torch.float64
    assert math.isclose(s.item(), 0.5, abs_tol=1e-6)


# AFLW2000-3D NME -----------------------------------------------------------------------------

def box_landmarks(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """(B,68,2) landmarks inside a 40 x 10 px box that they span exactly (sqrt(w h) = 20)."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(batch, 68, 2, generator=generator, dtype=torch.float64) * torch.tensor([40.0, 10.0]) + 100.0
    points[:, 0] = torch.tensor([100.0, 100.0])
    points[:, 1] = torch.tensor([140.0, 110.0])
    return points


def test_nme_aflw2000_divides_the_mean_distance_by_the_target_box_size():
    target = box_landmarks()
    torch.testing.assert_close(nme_aflw2000(target + torch.tensor([0.0, 2.0]), target),
                               torch.full((2,), 0.1, dtype=torch.float64))
    predicted = target.clone()
    predicted[:, 10] += torch.tensor([34.0, 0.0])
    predicted[:, 20] += torch.tensor([0.0, -34.0])  # two points off by 34 px: mean 1 px over 68
    torch.testing.assert_close(nme_aflw2000(predicted, target), torch.full((2,), 0.05, dtype=torch.float64))
    wide = target.clone()
    wide[:, 1] = torch.tensor([180.0, 110.0])  # the target box grows to 80 x 10
    torch.testing.assert_close(nme_aflw2000(wide + torch.tensor([0.0, 2.0]), wide),
                               torch.full((2,), 2.0 / math.sqrt(800.0), dtype=torch.float64))
    # the box is the target's, not the prediction's (which spans 80 x 10 here)
    predicted = target + torch.tensor([0.0, 2.0])
    predicted[:, 1] = torch.tensor([180.0, 112.0])  # 40 px right of its target point, and 2 px down
    expected = (67 * 2.0 + math.hypot(40.0, 2.0)) / 68 / 20.0
    torch.testing.assert_close(nme_aflw2000(predicted, target), torch.full((2,), expected, dtype=torch.float64))


def test_nme_aflw2000_in_3d_ignores_a_depth_offset_and_uses_3d_distances():
    target = torch.cat([box_landmarks(), torch.rand(2, 68, 1, dtype=torch.float64) * 50.0], dim=-1)
    zero = torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(nme_aflw2000(target + torch.tensor([0.0, 0.0, 7.0]), target), zero)
    torch.testing.assert_close(nme_aflw2000(target + torch.tensor([3.0, 0.0, 7.0]), target), zero + 3.0 / 20.0)
    predicted = target.clone()
    predicted[:, 0, 2] += 68.0  # raises the mean depth by 1: point 0 is 67 off in depth, the others 1
    torch.testing.assert_close(nme_aflw2000(predicted, target), zero + (67.0 + 67 * 1.0) / 68 / 20.0)


def test_nme_by_yaw_bins_absolute_yaw_and_balances_over_non_empty_bins():
    result = nme_by_yaw(torch.tensor([0.01, 0.03, 0.05, 0.07]), torch.tensor([10.0, -25.0, 60.0, -95.0]))
    assert result["[0,30)"] == pytest.approx(0.02) and result["[60,90]"] == pytest.approx(0.06)
    assert result["[30,60)"] is None
    assert result["mean"] == pytest.approx(0.04)  # (0.02 + 0.06) / 2, the empty bin is left out
    assert result["counts"] == {"[0,30)": 2, "[30,60)": 0, "[60,90]": 2}
    assert isinstance(result["mean"], float) and len(YAW_BINS) == 3
    edges = nme_by_yaw([1.0, 2.0, 3.0, 4.0], [0.0, 30.0, -59.9, 90.0])
    assert edges["counts"] == {"[0,30)": 1, "[30,60)": 2, "[60,90]": 1}
    assert edges["mean"] == pytest.approx((1.0 + 2.5 + 4.0) / 3)


# images, masks, albedo, lighting -----------------------------------------------------------------

def test_photometric_error_is_the_masked_mean_absolute_error():
    image = torch.zeros(2, 3, 4, 4)
    render = image.clone()
    render[:, :, :2] = 0.5  # top half off by 0.5 in every channel
    render[:, 0, 2:] = 0.3  # bottom half off by 0.3 in the red channel only
    top = torch.zeros(2, 1, 4, 4)
    top[:, :, :2] = 1.0
    torch.testing.assert_close(photometric_error(image, render, top), torch.full((2,), 0.5))
    torch.testing.assert_close(photometric_error(image, render, torch.ones(2, 4, 4)), torch.full((2,), (0.5 + 0.1) / 2))
    soft = torch.full((2, 4, 4), 0.25)  # a uniform soft weight changes nothing
    torch.testing.assert_close(photometric_error(image, render, soft), torch.full((2,), 0.3))
    empty = top.clone()
    empty[1] = 0.0
    error = photometric_error(image, render, empty)
    assert error[0] == pytest.approx(0.5) and torch.isnan(error[1])  # nothing to compare


def test_mask_iou_of_overlapping_squares_and_of_empty_masks():
    predicted = torch.zeros(3, 1, 8, 8)
    target = torch.zeros(3, 8, 8)
    predicted[0, 0, 0:4, 0:4] = 1.0
    target[0, 0:4, 2:6] = 0.9  # overlap 4 x 2 = 8 of a union 24
    predicted[1, 0, 0:4, 0:4] = 0.4  # below the 0.5 threshold: empty, and so is the target
    target[2, 0:2, 0:2] = 1.0  # predicted empty, target not
    torch.testing.assert_close(mask_iou(predicted, target), torch.tensor([1.0 / 3.0, 1.0, 0.0]))
    assert mask_iou(predicted, target, threshold=0.3)[1] == 0.0  # now the 0.4 block counts


def test_albedo_error_recovers_a_per_channel_gain_and_weights_drop_vertices():
    base = torch.tensor([0.2, 0.4, 0.6])
    target = base.expand(2, 50, 3).clone()
    target[:, ::2] *= 0.5  # not constant, so the gain is determined
    gain = torch.tensor([0.5, 2.0, 1.3])
    predicted = target * gain
    assert albedo_error(predicted, target).max() < 1e-6
    constant = base.expand(2, 50, 3)
    expected = ((gain - 1).abs() * base).mean()  # (0.1 + 0.4 + 0.18) / 3
    torch.testing.assert_close(albedo_error(constant * gain, constant, align="none"), expected.expand(2))
    weights = torch.ones(50)
    weights[:5] = 0.0
    corrupted = predicted.clone()
    corrupted[:, :5] = 9.0  # excluded from both the gain fit and the mean
    assert albedo_error(corrupted, target, weights=weights).max() < 1e-6
    assert albedo_error(corrupted, target).min() > 0.01


def test_lighting_error_of_a_dc_offset_is_the_offset_times_the_dc_basis_constant():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 9, generator=generator, dtype=torch.float64)
    assert lighting_error(target, target).max() == 0.0
    offset = torch.zeros(2, 3, 9, dtype=torch.float64)
    offset[:, :, 0] = torch.tensor([[0.5], [-0.2]])
    dc_constant = math.pi * 0.5 / math.sqrt(math.pi)  # A_0 * Y_00 = 0.886227
    for hemisphere in (True, False):
        torch.testing.assert_close(lighting_error(target + offset, target, hemisphere=hemisphere),
                                   torch.tensor([0.5, 0.2], dtype=torch.float64) * dc_constant)
    assert dc_constant == pytest.approx(0.886227, abs=1e-6)
    # a z coefficient e gives e * 1.023328 * z; |z| averages 1/2 over the hemisphere and the sphere
    tilt = torch.zeros(2, 3, 9, dtype=torch.float64)
    tilt[:, :, 2] = 0.3
    expected = torch.full((2,), 0.3 * 1.023328 * 0.5, dtype=torch.float64)
    torch.testing.assert_close(lighting_error(target + tilt, target), expected, atol=1e-6, rtol=0)


def test_lighting_error_compares_a_mono_light_with_every_rgb_channel():
    mono = torch.randn(2, 1, 9)
    torch.testing.assert_close(lighting_error(mono, mono.repeat(1, 3, 1)), torch.zeros(2))
    rgb = mono.repeat(1, 3, 1)
    rgb[:, 1, 0] += 0.3  # green only: a third of the channels
    torch.testing.assert_close(lighting_error(mono, rgb), torch.full((2,), 0.3 * 0.886227 / 3), atol=1e-6, rtol=0)


def test_sphere_directions_are_unit_and_cover_the_requested_part_evenly():
    everywhere, front = sphere_directions(1000), sphere_directions(1000, hemisphere=True)
    torch.testing.assert_close(everywhere.norm(dim=-1), torch.ones(1000, dtype=torch.float64))
    assert (front[:, 2] > 0).all() and everywhere[:, 2].min() < -0.99
    assert everywhere.mean(dim=0).abs().max() < 0.01  # balanced over the sphere
    torch.testing.assert_close(sphere_directions(1000), everywhere)  # deterministic


@pytest.mark.parametrize("call, message", [
    (lambda: nme_aflw2000(torch.zeros(1, 5, 2), torch.zeros(1, 5, 2)), "68-point"),
    (lambda: nme_aflw2000(torch.zeros(1, 68, 4), torch.zeros(1, 68, 4)), "(B,68,2) or (B,68,3)"),
    (lambda: nme_aflw2000(torch.zeros(1, 68, 3), torch.zeros(1, 68, 2)), "same shape"),
    (lambda: nme_by_yaw(torch.zeros(3), torch.zeros(2)), "same B"),
    (lambda: nme_by_yaw(torch.zeros(1), torch.tensor([math.nan])), "NaN"),
    (lambda: photometric_error(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.ones(1, 2, 4, 4)),
     "(1, 1, 4, 4)"),
    (lambda: photometric_error(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5), torch.ones(1, 4, 4)),
     "image's shape"),
    (lambda: photometric_error(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.full((1, 4, 4), 2.0)),
     "[0,1]"),
    (lambda: mask_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5)), "(1, 1, 4, 4)"),
    (lambda: albedo_error(torch.zeros(1, 5, 3), torch.zeros(1, 5, 3), align="gray"), "scale, none"),
    (lambda: lighting_error(torch.zeros(1, 3, 4), torch.zeros(1, 3, 9)), "(B,3,9) or (B,1,9)"),
    (lambda: lighting_error(torch.zeros(2, 3, 9), torch.zeros(1, 3, 9)), "batch sizes differ"),
])
def test_bad_input_to_the_new_metrics_raises_value_error_saying_what_is_wrong(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
