"""NoW-style scan evaluation: scan reading, exact point-to-mesh distance, ICP and the aligned error."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from facelab.eval.metrics import similarity_transform
from facelab.eval.scan import closest_points_on_triangles, icp, point_to_mesh_distance, scan_to_mesh_error
from facelab.eval.scan_io import read_landmarks, read_scan

NOSE_TIP_68 = 30
NOW_LANDMARKS_68 = [36, 39, 42, 45, 33, 48, 54]  # NoW: eye corners, nose bottom, mouth corners


# references and helpers ----------------------------------------------------------------------

def reference_distance(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Brute force by a different route than the library: the plane projection when it falls
    inside the triangle, else the nearest of the three clamped edge projections."""
    best = np.full(len(points), np.inf)
    for a, b, c in vertices[faces]:
        normal = np.cross(b - a, c - a)
        normal = normal / np.linalg.norm(normal)
        projected = points - ((points - a) @ normal)[:, None] * normal
        # barycentrics of the projection from signed sub-areas
        area = np.cross(b - a, c - a) @ normal
        u = np.cross(c - b, projected - b) @ normal / area
        v = np.cross(a - c, projected - c) @ normal / area
        w = 1.0 - u - v
        inside = (u >= 0) & (v >= 0) & (w >= 0)
        candidates = [np.where(inside, np.linalg.norm(points - projected, axis=1), np.inf)]
        for start, end in ((a, b), (b, c), (c, a)):
            edge = end - start
            t = np.clip((points - start) @ edge / (edge @ edge), 0.0, 1.0)
            candidates.append(np.linalg.norm(points - (start + t[:, None] * edge), axis=1))
        best = np.minimum(best, np.min(candidates, axis=0))
    return best


def rotation_about(axis, degrees: float) -> torch.Tensor:
    axis = torch.as_tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]],
                         dtype=torch.float64)
    angle = math.radians(degrees)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def rotation_angle_degrees(rotation: torch.Tensor) -> float:
    cosine = ((torch.trace(rotation) - 1.0) / 2.0).clamp(-1.0, 1.0)
    return math.degrees(math.acos(float(cosine)))


def sample_surface(vertices: torch.Tensor, faces: torch.Tensor, count: int, generator: torch.Generator):
    """count area-uniform random points on a mesh: (count,3) float64, their triangle ids."""
    corners = vertices.double()[faces]
    area = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]).norm(dim=-1)
    triangle = torch.multinomial(area, count, replacement=True, generator=generator)
    first, second = torch.rand(2, count, generator=generator, dtype=torch.float64)
    root = first.sqrt()
    weights = torch.stack([1 - root, root * (1 - second), root * second], dim=-1)
    return (corners[triangle] * weights[..., None]).sum(dim=1), triangle


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    corners = vertices.double()[faces]
    normal = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    return normal / normal.norm(dim=-1, keepdim=True)


# point-to-mesh distance ----------------------------------------------------------------------

TRIANGLE = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
# (point, closest point) in every Voronoi region of the triangle above
REGION_CASES = {
    "interior": ((1.0, 1.0, 2.0), (1.0, 1.0, 0.0)),
    "on the face": ((1.0, 0.5, 0.0), (1.0, 0.5, 0.0)),
    "beyond edge ab": ((2.0, -3.0, 4.0), (2.0, 0.0, 0.0)),
    "beyond edge ac": ((-1.0, 1.5, 0.0), (0.0, 1.5, 0.0)),
    "beyond edge bc": ((2.0 + 0.6 * 2, 1.5 + 0.8 * 2, 1.0), (2.0, 1.5, 0.0)),  # along the edge's outward normal
    "beyond vertex a": ((-1.0, -2.0, 2.0), (0.0, 0.0, 0.0)),
    "beyond vertex b": ((6.0, -1.0, 0.0), (4.0, 0.0, 0.0)),
    "beyond vertex c": ((-1.0, 5.0, 0.0), (0.0, 3.0, 0.0)),
}


@pytest.mark.parametrize("region", list(REGION_CASES))
def test_single_triangle_distance_is_exact_in_every_voronoi_region(region):
    point, expected = (torch.tensor(value, dtype=torch.float64) for value in REGION_CASES[region])
    distance, closest = point_to_mesh_distance(point[None], TRIANGLE, torch.tensor([[0, 1, 2]]))
    torch.testing.assert_close(closest[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(distance[0], (point - expected).norm(), atol=1e-12, rtol=0)
    for order in ([1, 2, 0], [2, 0, 1], [0, 2, 1]):  # corner order and winding do not matter
        torch.testing.assert_close(closest_points_on_triangles(point, TRIANGLE[order]), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bucket_size, buckets", [(16, 8), (2, 1), (1, 1)])
def test_pruned_distance_matches_brute_force_on_a_random_mesh(bucket_size, buckets):
    generator = torch.Generator().manual_seed(3)
    # a bumpy 7x7 height field plus a few loose triangles floating above it
    grid = torch.stack(torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij"), dim=-1).reshape(-1, 2)
    height = torch.rand(49, 1, generator=generator) * 2.0
    loose = torch.rand(15, 3, generator=generator) * torch.tensor([6.0, 6.0, 3.0]) + torch.tensor([0.0, 0.0, 1.0])
    vertices = torch.cat([torch.cat([grid, height], dim=1), loose]).double()
    cells = torch.tensor([[i + 7 * j for i in range(6)] for j in range(6)]).reshape(-1)
    quads = torch.stack([cells, cells + 1, cells + 8, cells + 7], dim=-1)
    faces = torch.cat([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]], torch.arange(49, 64).reshape(5, 3)])
    points = (torch.rand(400, 3, generator=generator) * torch.tensor([10.0, 10.0, 8.0]) - 2.0).double()
    distance, closest = point_to_mesh_distance(points, vertices, faces, chunk=64, bucket_size=bucket_size,
                                               buckets=buckets)
    expected = reference_distance(points.numpy(), vertices.numpy(), faces.numpy())
    np.testing.assert_allclose(distance.numpy(), expected, atol=1e-9, rtol=0)
    torch.testing.assert_close((points - closest).norm(dim=-1), distance, atol=1e-9, rtol=0)
    on_surface, _ = point_to_mesh_distance(closest, vertices, faces)
    assert on_surface.max() < 1e-9  # the closest points lie on the mesh


def test_distance_gradient_is_the_unit_direction_away_from_the_surface():
    points = torch.tensor([[1.0, 1.0, 2.0], [2.0, -3.0, 4.0], [-1.0, -2.0, 2.0]], dtype=torch.float64,
                          requires_grad=True)
    distance, closest = point_to_mesh_distance(points, TRIANGLE, torch.tensor([[0, 1, 2]]))
    distance.sum().backward()
    direction = (points - closest).detach()
    torch.testing.assert_close(points.grad, direction / direction.norm(dim=-1, keepdim=True))


# ICP and the NoW error -------------------------------------------------------------------------

def test_icp_recovers_a_known_similarity_from_a_partial_noisy_scan(lite_model):
    """The acceptance test: a partial (one side cut off), noisy, scaled, rotated and shifted copy of
    the lite face surface; ICP starts from a fit of NoW's 7 landmarks with 2 mm landmark noise
    (about 2-5 mm and 1-3 degrees off)."""
    generator = torch.Generator().manual_seed(0)
    vertices, faces = lite_model.mean.double(), lite_model.triangles
    surface, _ = sample_surface(vertices, faces, 1500, generator)
    surface = surface[surface[:, 0] < 25.0]  # drop most of the left side of the face (+x)
    true_scale, true_rotation = 1.1, rotation_about([0.3, 1.0, 0.2], 15.0)
    true_translation = torch.tensor([20.0, -35.0, 50.0], dtype=torch.float64)
    clean_scan = true_scale * surface @ true_rotation.T + true_translation
    sigma = 0.2  # mm, isotropic scanner noise
    scan = clean_scan + sigma * torch.randn(clean_scan.shape, generator=generator, dtype=torch.float64)
    mesh_landmarks = vertices[lite_model.landmarks_68[NOW_LANDMARKS_68]]
    scan_landmarks = true_scale * mesh_landmarks @ true_rotation.T + true_translation
    scan_landmarks = scan_landmarks + 2.0 * torch.randn(scan_landmarks.shape, generator=generator, dtype=torch.float64)
    init = tuple(part[0] for part in similarity_transform(scan_landmarks[None], mesh_landmarks[None]))

    s, rotation, translation = icp(scan, vertices, faces, init=init, iterations=50)

    def registration_error(transform):  # mean displacement of the noise-free scan from its true place
        scale, rot, shift = transform
        return float((scale * clean_scan @ rot.T + shift - surface).norm(dim=-1).mean())

    # ICP maps scan -> mesh: the inverse of the truth
    assert abs(float(s) * true_scale - 1.0) < 2e-3
    assert rotation_angle_degrees(rotation @ true_rotation) < 0.1
    assert registration_error((s, rotation, translation)) < 0.15
    assert registration_error(init) > 3 * registration_error((s, rotation, translation))  # ICP did the work
    # mean scan-to-surface distance in scan units: the noise's, for noise small against curvature,
    # is E|normal component| = sigma sqrt(2/pi)
    aligned_mesh = (vertices - translation) @ rotation / s
    distance, _ = point_to_mesh_distance(scan, aligned_mesh, faces)
    assert distance.mean() < 0.1 + sigma * math.sqrt(2.0 / math.pi)


def test_icp_is_the_identity_for_a_scan_of_the_surface_itself():
    generator = torch.Generator().manual_seed(1)
    vertices = torch.tensor([[0.0, 0, 0], [10, 0, 1], [0, 10, 2], [10, 10, 0], [5, 5, 6]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 4], [1, 3, 4], [3, 2, 4], [2, 0, 4]])
    points, _ = sample_surface(vertices, faces, 200, generator)
    s, rotation, translation = icp(points, vertices, faces, iterations=5)
    torch.testing.assert_close(s, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(rotation, torch.eye(3, dtype=torch.float64))
    assert translation.abs().max() < 1e-9


def test_scan_to_mesh_error_of_the_mesh_itself_is_zero_and_the_crop_drops_far_points(lite_model):
    vertices, faces = lite_model.mean.double(), lite_model.triangles
    landmarks = vertices[lite_model.landmarks_68]
    junk = torch.full((40, 3), 500.0, dtype=torch.float64)  # e.g. the scanner table, far from the face
    result = scan_to_mesh_error(torch.cat([vertices, junk]), landmarks, vertices, faces, lite_model.landmarks_68,
                                icp_iterations=5, crop_radius=300.0, crop_centre=NOSE_TIP_68)
    assert result["kept"].sum() == len(vertices) and not result["kept"][len(vertices):].any()
    assert result["median"] < 1e-6 and result["mean"] < 1e-6 and result["distances"].shape == (len(vertices),)
    torch.testing.assert_close(result["aligned_vertices"], vertices, atol=1e-6, rtol=0)


def test_scan_to_mesh_error_undoes_a_similarity_between_mesh_and_scan(lite_model):
    generator = torch.Generator().manual_seed(2)
    vertices, faces = lite_model.mean.double(), lite_model.triangles
    rotation, translation = rotation_about([1.0, 0.2, 0.0], 20.0), torch.tensor([5.0, 60.0, -30.0], dtype=torch.float64)
    scan_frame = 1.2 * vertices @ rotation.T + translation  # where the mesh should end up
    points, _ = sample_surface(scan_frame, faces, 800, generator)
    scan_landmarks = scan_frame[lite_model.landmarks_68]
    scan_landmarks = scan_landmarks + torch.randn(scan_landmarks.shape, generator=generator, dtype=torch.float64)
    result = scan_to_mesh_error(points, scan_landmarks, vertices, faces, lite_model.landmarks_68, icp_iterations=40)
    assert result["median"] < 0.02 and result["mean"] < 0.03
    assert (result["aligned_vertices"] - scan_frame).norm(dim=-1).mean() < 0.1


def test_scan_offset_along_the_normals_gives_that_offset_after_landmark_alignment(lite_model):
    vertices, faces = lite_model.mean.double(), lite_model.triangles
    offset = 0.3  # mm, small against the face's curvature
    centroids = vertices[faces].mean(dim=1)
    scan = centroids + offset * face_normals(vertices, faces)
    landmarks = vertices[lite_model.landmarks_68]
    result = scan_to_mesh_error(scan, landmarks, vertices, faces, landmarks, icp_iterations=0)
    assert result["distances"].max() <= offset + 1e-9  # nothing is further than the offset point's own triangle
    assert abs(result["median"] - offset) < 1e-6  # most points see their own triangle
    assert result["mean"] > 0.95 * offset


def test_trimmed_icp_ignores_a_displaced_region_and_reports_its_offset(lite_model):
    vertices, faces = lite_model.mean.double(), lite_model.triangles
    centroids = vertices[faces].mean(dim=1)
    nose = vertices[lite_model.landmarks_68[NOSE_TIP_68]]
    region = (centroids - nose).norm(dim=-1) < 20.0  # the nose, about 5% of the scan
    offset = 0.3
    scan = centroids + offset * region[:, None] * face_normals(vertices, faces)
    landmarks = vertices[lite_model.landmarks_68]
    result = scan_to_mesh_error(scan, landmarks, vertices, faces, landmarks, icp_iterations=10,
                                trim=float(region.float().mean()) + 0.02)
    distances = result["distances"]
    assert distances[~region].max() < 1e-6
    assert abs(float(distances[region].median()) - offset) < 1e-6
    torch.testing.assert_close(result["aligned_vertices"], vertices, atol=1e-6, rtol=0)


@pytest.mark.parametrize("call, message", [
    (lambda: point_to_mesh_distance(torch.zeros(4, 3), TRIANGLE, torch.tensor([[0, 1, 3]])), "vertex ids in 0..2"),
    (lambda: point_to_mesh_distance(torch.zeros(4, 2), TRIANGLE, torch.tensor([[0, 1, 2]])), "points must be (N,3)"),
    (lambda: icp(torch.rand(10, 3), TRIANGLE, torch.tensor([[0, 1, 2]]), trim=1.0), "trim must be a fraction"),
    (lambda: scan_to_mesh_error(torch.rand(10, 3), torch.rand(5, 3), TRIANGLE, torch.tensor([[0, 1, 2]]),
                                torch.rand(4, 3)), "correspond one to one"),
    (lambda: scan_to_mesh_error(torch.rand(10, 3), torch.rand(3, 3), TRIANGLE, torch.tensor([[0, 1, 2]]),
                                torch.rand(3, 3), crop_radius=5.0), "needs crop_centre"),
])
def test_bad_geometry_input_raises_value_error_saying_what_to_do(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


# reading scans ---------------------------------------------------------------------------------

CUBE = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]],
                np.float64) * 1.5
CUBE_QUADS = [[0, 3, 2, 1], [4, 5, 6, 7], [0, 1, 5, 4], [1, 2, 6, 5], [2, 3, 7, 6], [3, 0, 4, 7]]
LANDMARKS = np.array([[0.5, 0.25, 1.0], [-1.0, 2.0, 3.5], [10.0, 20.0, 30.125]])


def fan(polygons) -> np.ndarray:
    """The expected fan triangulation (v0, vi, vi+1) of each polygon, in order."""
    return np.array([[polygon[0], polygon[i], polygon[i + 1]]
                     for polygon in polygons for i in range(1, len(polygon) - 1)])


def test_obj_with_textured_quads_reads_back_fan_triangulated_with_a_picked_points_sidecar(tmp_path):
    lines = [f"v {x} {y} {z}" for x, y, z in CUBE] + ["vt 0 0", "vn 0 0 1"]
    lines += ["f " + " ".join(f"{index + 1}/1/1" for index in quad) for quad in CUBE_QUADS]
    (tmp_path / "scan.obj").write_text("# a cube\n" + "\n".join(lines) + "\n")
    points = "\n".join(f'  <point x="{x}" y="{y}" z="{z}" active="1" name="{i}"/>'
                       for i, (x, y, z) in enumerate(LANDMARKS))
    (tmp_path / "scan.pp").write_text(
        f"<!DOCTYPE PickedPoints>\n<PickedPoints>\n <DocumentData>\n  <DataFileName name=\"scan.obj\"/>\n"
        f" </DocumentData>\n{points}\n</PickedPoints>\n")
    scan = read_scan(tmp_path / "scan.obj")
    np.testing.assert_allclose(scan.points, CUBE, atol=1e-6)
    np.testing.assert_array_equal(scan.faces, fan(CUBE_QUADS))
    np.testing.assert_allclose(scan.landmarks, LANDMARKS)
    assert scan.points.dtype == np.float64 and scan.faces.shape == (12, 3)


def test_ascii_ply_with_mixed_polygons_and_extra_properties_reads_back(tmp_path):
    polygons = [[0, 1, 2], [0, 2, 3, 4], [4, 5, 6]]
    header = ["ply", "format ascii 1.0", "comment made by a test", "element vertex 8", "property float x",
              "property float y", "property float z", "property uchar red", "element face 3",
              "property list uchar int vertex_indices", "property float quality", "end_header"]
    body = [f"{float(x)!r} {float(y)!r} {float(z)!r} 255" for x, y, z in CUBE]
    body += [f"{len(polygon)} " + " ".join(map(str, polygon)) + " 0.5" for polygon in polygons]
    (tmp_path / "scan.ply").write_text("\n".join(header + body) + "\n")
    np.savetxt(tmp_path / "scan.lmk.txt", LANDMARKS)
    scan = read_scan(tmp_path / "scan.ply")
    np.testing.assert_array_equal(scan.points, CUBE)
    np.testing.assert_array_equal(scan.faces, fan(polygons))
    np.testing.assert_array_equal(scan.landmarks, LANDMARKS)


@pytest.mark.parametrize("polygons", [[[0, 1, 2], [2, 3, 4], [5, 6, 7]], [[0, 1, 2, 3], [4, 5, 6]]],
                         ids=["triangles", "mixed polygons"])
def test_binary_little_endian_ply_reads_back(tmp_path, polygons):
    header = ("ply\nformat binary_little_endian 1.0\nelement vertex 8\nproperty double x\nproperty double y\n"
              "property double z\nproperty float confidence\nelement face %d\n"
              "property list uchar int vertex_indices\nend_header\n" % len(polygons))
    body = b"".join(struct.pack("<dddf", *point, 0.9) for point in CUBE)
    body += b"".join(struct.pack(f"<B{len(p)}i", len(p), *p) for p in polygons)
    (tmp_path / "scan.ply").write_bytes(header.encode("ascii") + body)
    np.save(tmp_path / "scan.npy", LANDMARKS)
    scan = read_scan(tmp_path / "scan.ply")
    np.testing.assert_array_equal(scan.points, CUBE)
    np.testing.assert_array_equal(scan.faces, fan(polygons))
    np.testing.assert_array_equal(scan.landmarks, LANDMARKS)


def test_point_cloud_without_faces_or_landmarks_reads_back(tmp_path):
    (tmp_path / "cloud.obj").write_text("".join(f"v {x} {y} {z}\n" for x, y, z in CUBE))
    scan = read_scan(tmp_path / "cloud.obj")
    assert scan.faces is None and scan.landmarks is None and scan.points.shape == (8, 3)
    np.savetxt(tmp_path / "cloud_landmarks.txt", LANDMARKS)
    np.testing.assert_array_equal(read_scan(tmp_path / "cloud.obj").landmarks, LANDMARKS)


@pytest.mark.parametrize("name, content, expected", [
    ("bad.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 x\n", "not a readable OBJ mesh"),
    ("bad.obj", "hello\n", "not a readable OBJ mesh"),
    ("bad.ply", "ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
                "end_header\n0 0 0\n1 1\n", "not a readable PLY mesh"),
    ("bad.ply", "PK\x03\x04 a zip file", "not a readable PLY mesh"),
    ("bad.stl", "solid x\n", "expected an .obj or .ply mesh"),
])
def test_garbled_scan_raises_value_error_naming_the_file(tmp_path, name, content, expected):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError) as info:
        read_scan(tmp_path / name)
    assert name in str(info.value) and expected in str(info.value)


def test_missing_scan_and_garbled_landmark_sidecar_raise_value_error_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.obj: no such scan file"):
        read_scan(tmp_path / "missing.obj")
    (tmp_path / "scan.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    (tmp_path / "scan.pp").write_text("<PickedPoints><point x='1' y='2'/></PickedPoints>")  # no z
    with pytest.raises(ValueError, match=r"scan\.pp: not a readable landmark file"):
        read_scan(tmp_path / "scan.obj")
    (tmp_path / "two.txt").write_text("1 2\n3 4\n")
    with pytest.raises(ValueError, match=r"two\.txt: got landmarks of shape \(2, 2\)"):
        read_landmarks(tmp_path / "two.txt")
