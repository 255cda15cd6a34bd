"""The specular method: output layout, the zero-initialised start, its loss terms and gradients."""

from __future__ import annotations

import pytest
import torch

from facelab.config import compose
from facelab.data.schema import REGION_LABELS
from facelab.losses.photometric import masked_photometric
from facelab.methods import get_method

SIZE = 64


def make_method(*overrides: str):
    cfg = compose(["logger=csv", "method.backbone=resnet18", f"data.image_size={SIZE}", *overrides])
    return get_method("specular")(cfg)


@pytest.fixture(scope="module")
def method(lite_model):
    return make_method()


def rendered_batch(method, expression: torch.Tensor | None = None) -> dict:
    """A batch whose targets are the method's own render of the mean face (optionally with an
    expression): landmarks, mask and mouth region taken from that render."""
    params = method.mean_params(2)
    if expression is not None:
        params["expression"] = expression
    with torch.no_grad():
        out = method.reconstruct(params)
    mouth = (out["mouth"] > 0.5).long() * REGION_LABELS["mouth_interior"]
    return {"image": out["render"].clamp(0, 1), "mask": out["coverage"], "landmarks": out["landmarks"],
            "landmarks_conf": torch.ones(2, 68), "regions": mouth}


def test_output_groups_have_the_spec_sizes(method):
    model = method.face_model
    groups = method.encoder.groups
    assert groups == {"shape": 100, "expression": 53, "albedo": model.num_albedo, "euler": 3, "translation": 3,
                      "scale": 1, "sh": 27, "light_position": 3}
    assert sum(groups.values()) == 190 + model.num_albedo
    flat = torch.arange(sum(groups.values()), dtype=torch.float32)[None]
    split = method.encoder.split(flat)
    assert split["albedo"][0, 0] == 153 and split["light_position"][0, -1] == flat[0, -1]


def test_zero_head_starts_at_the_mean_face_with_white_light_at_the_camera(method):
    images = torch.rand(2, 3, SIZE, SIZE)
    out = method.eval()(images)
    assert torch.allclose(out["vertices"], method.face_model.mean.expand(2, -1, -1))
    assert torch.allclose(out["sh"][:, :, 0], torch.full((2, 3), 0.8))
    assert torch.count_nonzero(out["sh"][:, :, 1:]) == 0
    assert torch.count_nonzero(out["light_position"]) == 0  # the camera is the origin of camera space
    assert out["coverage"].mean() > 0.2  # the mean face fills a good part of the crop
    centre = out["landmarks"].mean(dim=1)
    assert torch.allclose(centre, torch.full_like(centre, SIZE / 2), atol=SIZE * 0.1)


def test_full_render_is_gamma_of_diffuse_plus_specular(method):
    out = method.reconstruct(method.mean_params(1))
    diffuse, specular, _ = method.shade(method.decode(method.mean_params(1)))
    assert specular.max() > 0.05  # a highlight is there
    inside = out["coverage"][0, 0] > 0
    # the full render is brighter than the diffuse-only one exactly where the highlight lands
    assert (out["render"] - out["render_diffuse"])[0][:, inside].min() >= -1e-6


def test_losses_are_finite_at_zero_init_and_vanish_for_a_perfect_render(method):
    batch = rendered_batch(method)
    out = method.reconstruct(method.mean_params(2))
    values = method.loss_values(batch, out, {name: True for name in method.loss_names})
    assert set(values) == set(method.loss_names)
    assert all(torch.isfinite(value) for value in values.values())
    assert values["lmk"] < 1e-3 and values["reg"] == 0
    # the full render matches: what is left is the diffuse-only term, which misses the highlight
    mask = (batch["mask"] * out["coverage"])[:, 0]
    highlight = masked_photometric(batch["image"], method.over_input(out, "render_diffuse", batch["image"]), mask)
    assert highlight > 0.005 and abs(values["photo"] - highlight) < 2e-3
    assert values["id"] < 3e-3  # the same image and crop; only rim pixels differ (render over itself)


def test_mouth_mask_gets_gradients_from_the_expression(method):
    jaw = method.face_model.expression_names.index("jawOpen")
    expression = torch.zeros(2, method.face_model.num_expression)
    expression[:, jaw] = 0.6
    target = rendered_batch(method, expression)
    assert target["regions"].bool().sum() > 20  # the open mouth is visible
    params = method.mean_params(2)
    start = torch.zeros_like(expression)
    start[:, jaw] = 0.25  # a closed mouth's patch has no area, and so no gradient: start ajar
    params["expression"] = start.requires_grad_()
    out = method.reconstruct(params)
    loss = method.loss_values(target, out, {"mouth": True})["mouth"]
    loss.backward()
    assert params["expression"].grad[:, jaw].lt(0).all()  # opening the jaw lowers the mouth-mask error


def test_mouth_term_adds_no_gradient_before_its_start_step(lite_model):
    method = make_method("method.losses.mouth.start_step=5", "method.losses.id.weight=0")
    jaw = method.face_model.expression_names.index("jawOpen")
    expression = torch.zeros(2, method.face_model.num_expression)
    expression[:, jaw] = 0.6
    batch = rendered_batch(method, expression)

    def gradient(step: int, terms: dict) -> torch.Tensor:
        params = method.mean_params(2)
        params["expression"][:, jaw] = 0.25  # ajar: a closed mouth gives the mask term no gradient
        params["expression"].requires_grad_()
        out = method.reconstruct(params)
        total, logged = terms.combine(method.loss_values(batch, out, terms.needed(step)), step)
        total.backward()
        return params["expression"].grad[:, jaw], logged

    from facelab.losses.terms import LossTerms

    without_mouth = LossTerms([term for term in method.loss_terms if term.name != "mouth"] +
                              [type(method.loss_terms.terms["mouth"])("mouth", 0.0)])
    before, logged = gradient(4, method.loss_terms)
    assert logged["loss/mouth"] > 0 and logged["loss/mouth_weighted"] == 0  # logged, not weighted
    assert torch.equal(before, gradient(4, without_mouth)[0])
    after, logged = gradient(5, method.loss_terms)
    assert logged["loss/mouth_weighted"] > 0
    assert not torch.allclose(after, before)


def test_bad_options_are_clear_errors(lite_model):
    with pytest.raises(ValueError, match="method.camera='orthographic'; valid: perspective, weak_perspective"):
        make_method("method.camera=orthographic")
    with pytest.raises(ValueError, match="loss term 'smooth' is not one this method computes"):
        make_method("+method.losses.smooth.weight=1")


@pytest.mark.parametrize("option", ["method.camera=weak_perspective", "method.shininess=per_image",
                                    "method.shininess=learned_global", "method.gamma_rule=separate"])
def test_every_open_choice_renders_a_centred_face_with_finite_gradients(lite_model, option):
    method = make_method(option)
    params = {name: value.requires_grad_() for name, value in method.mean_params(2).items()}
    out = method.reconstruct(params)
    assert 0.2 < out["coverage"].mean() < 0.95
    centre = out["landmarks"].mean(dim=1)
    assert torch.allclose(centre, torch.full_like(centre, SIZE / 2), atol=SIZE * 0.1)
    (out["render"].mean() + out["landmarks"].mean()).backward()
    assert all(torch.isfinite(value.grad).all() for value in params.values() if value.grad is not None)
    assert params["euler"].grad.abs().sum() > 0 and params["sh"].grad.abs().sum() > 0
