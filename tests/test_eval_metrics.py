"""Evaluation metrics: Umeyama alignment, aligned vertex error and landmark NME."""

from __future__ import annotations

import math

import pytest
import torch

from facelab.eval.metrics import aligned_vertex_error, apply_similarity, landmark_error, similarity_transform


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
