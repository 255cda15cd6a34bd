"""The face model layer: converter, mirror map, regions, dense landmarks, levels, FaceModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facelab.facemodel import IBUG_MIRROR_68, FaceModel, ict, mediapipe
from facelab.facemodel.derive import DISJOINT_REGIONS
from facelab.facemodel.format import FaceModelFormatError, load_model, save_model, validate
from facelab.facemodel.geometry import boundary_loops, project_to_surface
from facelab.facemodel.obj import read_obj

from .conftest import MIRROR

needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no asset mirror at {MIRROR}")
LEVELS = ["full_model", "lite_model"]


@pytest.fixture(params=LEVELS)
def model(request) -> FaceModel:
    return request.getfixturevalue(request.param)


@needs_mirror
def test_converter_reads_upstream_obj_folder_equal_to_raw_arrays():
    folder = MIRROR / "ict-facekit" / "obj_sample"
    from_obj = ict.raw_arrays_from_obj_folder(folder, expressions=["jawOpen"])
    raw = ict.load_raw(MIRROR / "ict-facekit" / "ict_face_model_light.npz")
    jaw_open = list(raw["exp_names"]).index("jawOpen")
    np.testing.assert_array_equal(from_obj["neutral"], raw["neutral"])
    np.testing.assert_allclose(from_obj["id_basis"][0], raw["id_basis"][0], atol=1e-5)  # cm
    np.testing.assert_allclose(from_obj["exp_basis"][0], raw["exp_basis"][jaw_open], atol=1e-5)
    np.testing.assert_array_equal(from_obj["faces_v"], raw["faces_v"])
    np.testing.assert_array_equal(from_obj["faces_vt"], raw["faces_vt"])
    np.testing.assert_array_equal(from_obj["vt"], raw["vt"])
    # and the cropped, converted model is the same from either source
    cropped_obj, cropped_raw = ict.crop(from_obj), ict.crop(raw)
    np.testing.assert_array_equal(cropped_obj["triangles"], cropped_raw["triangles"])
    np.testing.assert_allclose(cropped_obj["shape_basis"][0], cropped_raw["shape_basis"][0], atol=1e-4)


def test_full_model_is_the_face_region_in_millimetres(full_model):
    assert full_model.num_vertices == 9409
    assert full_model.triangles.shape == (18460, 3)
    assert (full_model.num_shape, full_model.num_expression) == (100, 53)
    assert full_model.meta["units"] == "mm" and "MIT" in full_model.meta["licence"]


def test_mirror_map_is_an_involution_that_swaps_ibug_partners_and_fixes_the_mean(model):
    mirror = model.mirror
    assert torch.equal(mirror[mirror], torch.arange(model.num_vertices))
    landmarks = model.landmarks_68
    assert torch.equal(mirror[landmarks], landmarks[torch.as_tensor(IBUG_MIRROR_68)])
    error = (model.mirror_vertices(model.mean[None])[0] - model.mean).norm(dim=-1)
    assert error.max() < 1.0  # mm


def test_random_identities_have_plausible_face_width(model):
    generator = torch.Generator().manual_seed(0)
    vertices = model(shape=torch.randn(1000, model.num_shape, generator=generator))
    landmarks = model.landmarks(vertices)
    width = (landmarks[:, 0] - landmarks[:, 16]).norm(dim=-1)  # jaw ends, at the ears' level
    inside = ((width > 120.0) & (width < 170.0)).float().mean()
    assert inside >= 0.99, (inside, width.min(), width.max())  # N(0,1) tails reach ~3 sigma
    assert 135.0 < width.mean() < 160.0
    assert width.std() > 1.0  # the identity modes do change the face


def test_lite_level_is_an_exact_restriction_of_the_full_model(full_model, lite_model):
    kept = lite_model.parent_ids
    assert 2000 <= lite_model.num_vertices <= 4000
    torch.testing.assert_close(lite_model.mean, full_model.mean[kept], rtol=0, atol=0)
    torch.testing.assert_close(lite_model.shape_basis, full_model.shape_basis[:, kept], rtol=0, atol=0)
    torch.testing.assert_close(lite_model.expression_basis, full_model.expression_basis[:, kept], rtol=0, atol=0)
    torch.testing.assert_close(lite_model.albedo_basis, full_model.albedo_basis[:, kept], rtol=0, atol=0)
    assert torch.equal(kept[lite_model.landmarks_68], full_model.landmarks_68)
    assert torch.equal(kept[lite_model.mirror], full_model.mirror[kept])


def test_lite_upsampling_reproduces_the_full_mesh(full_model, lite_model):
    codes = torch.randn(2, lite_model.num_shape, generator=torch.Generator().manual_seed(1))
    upsampled = lite_model.upsample_to_parent(lite_model(shape=codes))
    error = (upsampled - full_model(shape=codes)).norm(dim=-1)
    assert error[:, lite_model.parent_ids].max() < 1e-4  # kept vertices map to themselves
    assert error.mean() < 0.5 and error.max() < 3.0  # mm, elsewhere through barycentrics


def test_regions_are_nonempty_disjoint_and_hold_their_landmarks(model):
    regions = model.regions
    assert all(mask.any() for mask in regions.values()), {k: int(v.sum()) for k, v in regions.items()}
    partition = torch.stack([regions[name] for name in DISJOINT_REGIONS]).int()
    assert torch.equal(partition.sum(dim=0), torch.ones(model.num_vertices, dtype=torch.int))
    landmarks = model.landmarks_68
    for name, ids in [("eyes", range(36, 48)), ("brows", range(17, 27)), ("lips", range(48, 60)),
                      ("inner_mouth", range(60, 68)), ("nose", range(27, 36)), ("jaw_contour", range(17))]:
        assert regions[name][landmarks[list(ids)]].all(), name
    # regions are mirror symmetric
    for name, mask in regions.items():
        assert torch.equal(mask[model.mirror], mask), name


def test_nose_tip_is_the_most_forward_landmark(model):
    landmarks = model.landmarks(model.mean[None])[0]
    assert int(landmarks[:, 2].argmax()) == 30


def test_dense_mediapipe_registration_lies_on_the_mean_surface(full_model):
    canonical = read_obj(MIRROR / "mediapipe" / "canonical_face_model.obj")
    vertices = full_model.mean.double().numpy()
    triangles = full_model.triangles.numpy()
    embedding = mediapipe.embed_dense_landmarks(canonical.vertices, canonical.faces_v[:, :3], vertices,
                                                triangles, full_model.landmarks_68.numpy())
    _, _, distance = project_to_surface(embedding["dense_registered"], vertices, triangles)
    assert distance.max() < 3.0, distance.max()  # mm, each of the 468 canonical points


def test_dense_landmarks_agree_with_the_68_landmarks(model):
    dense = model.dense_landmarks(model.mean[None])[0]
    assert dense.shape == (478, 3) and int(model.dense_valid.sum()) == 468
    error = (dense[torch.as_tensor(mediapipe.MEDIAPIPE_TO_68)] - model.landmarks(model.mean[None])[0]).norm(dim=-1)
    assert error.max() < 5.0, error.max()


def test_mouth_patch_closes_the_inner_lip_loop(model):
    vertices, patch = model.mouth_patch(model.mean[None])
    assert vertices.shape == (1, model.num_vertices + 1, 3)
    before = boundary_loops(model.triangles.numpy())
    after = boundary_loops(np.concatenate([model.triangles.numpy(), patch.numpy()]))
    assert len(after) == len(before) - 1
    # the patch faces forward like the face (its normals have +z on average)
    corners = vertices[0][patch]
    normals = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)
    assert normals[:, 2].sum() > 0


def test_uvs_of_both_levels_stay_in_the_face_tile_without_seam_crossings(model):
    uv = model.uv[model.uv_triangles]  # (T,3,2)
    assert uv.min() >= 0 and uv.max() <= 1
    edges = (uv - uv.roll(1, dims=1)).norm(dim=-1).max(dim=1).values
    assert edges.max() < 0.2  # a triangle across a seam would span the tile


def test_albedo_prior_samples_are_plausible_reflectance(model):
    assert model.num_albedo == len(model.specular_basis)
    generator = torch.Generator().manual_seed(2)
    codes = torch.randn(64, model.num_albedo, generator=generator)
    diffuse, specular = model.albedo(codes), model.specular(codes)
    inside = ((diffuse >= 0) & (diffuse <= 1)).float().mean()
    assert inside > 0.99, inside
    assert (model.albedo_mean[model.regions["lips"]][:, 0].mean()
            > model.albedo_mean[model.regions["lips"]][:, 1].mean())  # lips are red
    assert specular.shape == diffuse.shape and specular.mean() > 0
    # one coefficient vector drives both: a single mode moves both albedos
    single = torch.zeros(1, model.num_albedo)
    single[0, 0] = 1.0
    assert (model.albedo(single) - model.albedo()).abs().max() > 0
    assert (model.specular(single) - model.specular()).abs().max() > 0


def test_pca_expression_space_matches_blendshape_weights(lite_model):
    from facelab.facemodel import model_path

    pca = FaceModel.from_file(model_path("ict-face-lite"), expression_space="pca")
    codes = torch.randn(3, pca.num_expression, generator=torch.Generator().manual_seed(3))
    weights = pca.blendshape_weights(codes)
    torch.testing.assert_close(pca(expression=codes), lite_model(expression=weights), atol=1e-3, rtol=1e-4)


def test_forward_rejects_wrong_coefficient_shapes(lite_model):
    with pytest.raises(ValueError, match=r"shape coefficients must be \(B,100\)"):
        lite_model(shape=torch.zeros(2, 99))
    with pytest.raises(ValueError, match="batch sizes differ"):
        lite_model(shape=torch.zeros(2, 100), expression=torch.zeros(3, 53))


def test_model_file_round_trip_and_clear_errors(tmp_path, lite_model):
    arrays = {"mean": np.zeros((3, 3), np.float32), "shape_basis": np.zeros((1, 3, 3), np.float32),
              "expression_basis": np.zeros((1, 3, 3), np.float32), "expression_names": np.array(["a"]),
              "albedo_mean": np.zeros((3, 3), np.float32), "albedo_basis": np.zeros((1, 3, 3), np.float32),
              "triangles": np.array([[0, 1, 2]], np.int32), "landmarks_68": np.zeros(68, np.int64),
              "mirror": np.array([0, 2, 1])}
    meta = {"name": "tiny", "licence": "test", "source": "test", "units": "mm", "expression_kind": "blendshape"}
    path = save_model(tmp_path / "tiny.npz", arrays, meta)
    loaded, loaded_meta = load_model(path)
    assert loaded_meta["name"] == "tiny" and np.array_equal(loaded["mirror"], arrays["mirror"])
    broken = dict(arrays, triangles=np.array([[0, 1, 5]], np.int32))
    with pytest.raises(FaceModelFormatError, match="'triangles' index outside"):
        validate(broken, meta, "tiny.npz")
    with pytest.raises(FaceModelFormatError, match="missing array 'mirror'"):
        validate({k: v for k, v in arrays.items() if k != "mirror"}, meta, "tiny.npz")
    with pytest.raises(FileNotFoundError, match="facelab assets build"):
        load_model(tmp_path / "absent.npz")
