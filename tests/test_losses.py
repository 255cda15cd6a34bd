"""Loss functions against hand-computed values, and the config-driven term weighting."""

from __future__ import annotations

import math

import pytest
import torch

from facelab.losses.geometric import landmark_reprojection, landmark_weights, mask_l1
from facelab.losses.identity import composite, identity_cosine
from facelab.losses.photometric import hybrid_photometric, masked_photometric, skin_confidence
from facelab.losses.priors import coefficient_l2, colour_variance, sh_channel_spread, uniform
from facelab.losses.terms import LossTerms


def distance(d: float) -> float:
    """A pixel's colour distance as the losses define it: sqrt(1e-6 + d^2)."""
    return math.sqrt(1e-6 + d * d)


def test_masked_photometric_is_the_weighted_mean_colour_distance_inside_the_mask():
    image = torch.zeros(1, 3, 2, 2)
    render = torch.zeros(1, 3, 2, 2)
    render[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])  # distance 5
    render[0, :, 0, 1] = torch.tensor([0.0, 0.0, 2.0])  # distance 2
    render[0, :, 1, 1] = 100.0  # outside the mask
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    assert masked_photometric(image, render, mask).item() == pytest.approx((distance(5) + distance(2) + distance(0)) / 3, abs=1e-6)
    weights = torch.tensor([[[1.0, 0.5], [0.0, 1.0]]])
    assert masked_photometric(image, render, mask, weights).item() == pytest.approx((distance(5) + 0.5 * distance(2)) / 1.5, abs=1e-6)


def test_hybrid_photometric_adds_the_skin_weighted_diffuse_term_and_eta_times_the_full_term():
    image = torch.full((1, 3, 1, 2), 0.5)
    diffuse = image.clone()
    diffuse[0, 0, 0, 1] = 0.1  # a highlight the diffuse render does not explain: distance 0.4
    full = image.clone()  # the specular part explains it
    mask = torch.ones(1, 1, 2)
    skin = skin_confidence(torch.tensor([[[0.9, 0.2]]]))  # the highlight pixel looks less skin-like
    assert skin.tolist() == [[[1.0, pytest.approx(0.2)]]]
    expected_diffuse = (distance(0) + 0.2 * distance(0.4)) / 1.2
    assert hybrid_photometric(image, diffuse, full, mask, skin, eta=2.0).item() == pytest.approx(
        expected_diffuse + 2.0 * distance(0), abs=1e-6)
    full[0, 2, 0, 0] = 0.8  # now the full render misses by 0.3 on one pixel of two
    assert hybrid_photometric(image, diffuse, full, mask, skin, eta=2.0).item() == pytest.approx(
        expected_diffuse + 2.0 * (distance(0.3) + distance(0)) / 2, abs=1e-6)


def test_photometric_gradient_is_finite_where_render_equals_image():
    image = torch.rand(1, 3, 4, 4)
    render = image.clone().requires_grad_(True)
    masked_photometric(image, render, torch.ones(1, 4, 4)).backward()
    assert torch.isfinite(render.grad).all()


def test_landmark_reprojection_weights_brows_and_outer_lips():
    weights = landmark_weights()
    assert weights[17:27].eq(20).all() and weights[48:60].eq(20).all()
    assert weights[60:68].eq(1).all() and weights[:17].eq(1).all() and weights[27:48].eq(1).all()
    target = torch.zeros(1, 68, 2)
    predicted = torch.zeros(1, 68, 2)
    predicted[0, 0] = torch.tensor([3.0, 4.0])  # jaw: weight 1, distance 5
    predicted[0, 50] = torch.tensor([0.0, 2.0])  # outer lip: weight 20, distance 2
    assert landmark_reprojection(predicted, target, weights).item() == pytest.approx((5 + 40) / 68, abs=1e-5)
    assert landmark_reprojection(predicted, target, weights, squared=True).item() == pytest.approx((25 + 80) / 68, abs=1e-5)
    confidence = torch.ones(1, 68)
    confidence[0, 50] = 0.5
    assert landmark_reprojection(predicted, target, weights, confidence).item() == pytest.approx((5 + 20) / 68, abs=1e-5)


def test_mask_l1_sums_over_pixels_and_averages_over_the_batch():
    target = torch.zeros(2, 3, 3)
    target[0, 1, 1] = 1
    predicted = torch.zeros(2, 3, 3)
    predicted[0, 0, 0] = 0.25
    predicted[1] = 0.5
    assert mask_l1(target, predicted).item() == pytest.approx(((1 + 0.25) + 9 * 0.5) / 2)


def test_coefficient_l2_sums_groups_per_sample_and_averages_the_batch():
    shape = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    albedo = torch.tensor([[2.0], [1.0]])
    assert coefficient_l2(shape, albedo).item() == pytest.approx(((1 + 4 + 4) + 1) / 2)


def test_uniform_term_is_zero_for_constant_albedo_and_grey_light_and_positive_otherwise():
    constant = torch.full((1, 5, 3), 0.4)
    grey = torch.zeros(1, 3, 9)
    grey[:, :, 0] = 0.8
    assert uniform(constant, grey).item() == 0.0
    varying = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])  # mean 0.5: each point 3 * 0.25 away
    assert colour_variance(varying).item() == pytest.approx(0.75)
    assert colour_variance(varying, norm="l1").item() == pytest.approx(1.5)
    assert colour_variance(varying, torch.tensor([1.0, 0.0])).item() == 0.0  # one point: no spread
    tinted = grey.clone()
    tinted[0, 0, 0] = 1.1  # red DC 0.3 above the others: mean 0.9; deviations 0.2, -0.1, -0.1
    assert sh_channel_spread(tinted).item() == pytest.approx(0.06, abs=1e-6)
    assert sh_channel_spread(tinted, "mean").item() == pytest.approx(0.06 / 27, abs=1e-7)
    assert uniform(varying, tinted).item() == pytest.approx(0.81, abs=1e-5)


def test_identity_cosine_and_composite():
    reference = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    predicted = torch.tensor([[3.0, 0.0], [1.0, 1.0]], requires_grad=True)
    value = identity_cosine(reference, predicted)
    assert value.item() == pytest.approx((0 + (1 - 1 / math.sqrt(2))) / 2, abs=1e-6)
    value.backward()
    assert predicted.grad.abs().sum() > 0
    render, image = torch.ones(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    pasted = composite(render, image, torch.tensor([[[1.0, 0.25]]]))
    assert pasted[0, :, 0, 0].tolist() == [1.0] * 3 and pasted[0, :, 0, 1].tolist() == [0.25] * 3


def test_terms_weigh_by_config_and_a_term_before_its_start_step_adds_nothing_but_is_logged():
    terms = LossTerms.from_config({"photo": {"weight": 2.0}, "mouth": {"weight": 0.5, "start_step": 0.25}},
                                  known=("photo", "mouth", "reg"), max_steps=100)
    assert [term.start_step for term in terms] == [0, 25]
    values = {"photo": torch.tensor(1.5), "mouth": torch.tensor(4.0, requires_grad=True)}
    total, log = terms.combine(values, step=24)
    assert total.item() == 3.0 and log["loss/mouth"].item() == 4.0 and log["loss/mouth_weighted"].item() == 0.0
    assert terms.needed(24) == {"photo": True, "mouth": False}
    total, log = terms.combine(values, step=25)
    assert total.item() == 5.0 and log["loss/total"].item() == 5.0
    total.backward()
    assert values["mouth"].grad.item() == 0.5


def test_terms_reject_unknown_names_and_keys_with_the_valid_ones():
    with pytest.raises(ValueError, match="known: photo, reg"):
        LossTerms.from_config({"photometric": {"weight": 1.0}}, known=("photo", "reg"))
    with pytest.raises(ValueError, match="unknown key.*wieght.*valid: weight, start_step"):
        LossTerms.from_config({"photo": {"wieght": 1.0}}, known=("photo",))
    with pytest.raises(KeyError, match="reg"):
        LossTerms.from_config({"reg": {}}, known=("reg",)).combine({}, step=0)
