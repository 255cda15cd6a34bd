"""The declared albedo prior: a hand-set reflectance model, documented as a prior, not data.

No albedo PCA model can be redistributed with facelab, so the default diffuse and specular
albedo are built from the mesh itself:

- a mean: one linear-RGB tone per region (skin, lips, brows, eye area, nostrils, inner mouth),
  smoothed across region borders;
- global tone axes: overall brightness, warm/cool and red/green (haemoglobin-like) shifts of the
  mean, each with a 1-sigma size below;
- the lowest vibration modes of the mesh (cotangent Laplacian eigenvectors), one per colour
  channel, with standard deviations that decay with frequency.

One coefficient vector drives both bases (as in AlbedoMM-style models): the specular basis has a
grey counterpart of each diffuse mode. Coefficients are N(0,1). Values are linear reflectance in
[0,1]; users with a real PCA albedo (BFM, AlbedoMM) replace this through the converters.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .geometry import adjacency, cotangent_laplacian

# Linear-RGB region tones (diffuse) and grey specular levels.
DIFFUSE_TONES = {
    "skin": (0.50, 0.33, 0.25),
    "lips": (0.50, 0.22, 0.20),
    "brows": (0.12, 0.08, 0.06),
    "eyes": (0.42, 0.27, 0.21),
    "nostrils": (0.25, 0.14, 0.11),
    "inner_mouth": (0.40, 0.15, 0.15),
}
SPECULAR_LEVELS = {"skin": 0.20, "lips": 0.25, "brows": 0.05, "eyes": 0.15, "nostrils": 0.05, "inner_mouth": 0.10}
NOSE_SPECULAR_BOOST = 0.08  # the T-zone is oilier
TONE_AXES = (  # (name, per-channel multiplier of the mean tone for +1 sigma)
    ("brightness", (0.25, 0.25, 0.25)),
    ("warm_cool", (0.10, 0.0, -0.10)),
    ("red_green", (0.06, -0.06, 0.0)),
)
LAPLACIAN_SIGMA = 0.02  # 1-sigma size of the lowest vibration mode, linear reflectance units
LAPLACIAN_DECAY = 8.0  # sigma_k = LAPLACIAN_SIGMA / (1 + k / LAPLACIAN_DECAY)


def albedo_prior(vertices: np.ndarray, triangles: np.ndarray, regions: dict[str, np.ndarray],
                 num_laplacian_modes: int = 40, smoothing_steps: int = 6) -> dict[str, np.ndarray]:
    """Build the prior on a mesh.

    vertices: (V,3) mm; triangles: (T,3); regions: name -> (V,) bool (the partition of
    ``derive.DISJOINT_REGIONS`` plus ``nose``).
    Returns albedo_mean, specular_mean (V,3), albedo_basis, specular_basis (K,V,3) with
    K = 3 + 3 * num_laplacian_modes, and albedo_mode_names (K,).
    """
    num_vertices = len(vertices)
    diffuse = np.zeros((num_vertices, 3))
    specular = np.zeros(num_vertices)
    for name, tone in DIFFUSE_TONES.items():
        diffuse[regions[name]] = tone
        specular[regions[name]] = SPECULAR_LEVELS[name]
    specular[regions["nose"] & regions["skin"]] += NOSE_SPECULAR_BOOST
    smoothed = _smooth(np.column_stack([diffuse, specular]), triangles, smoothing_steps)
    diffuse_mean = smoothed[:, :3]
    specular_mean = np.repeat(smoothed[:, 3:], 3, axis=1)

    diffuse_modes, specular_modes, names = [], [], []
    for name, multiplier in TONE_AXES:
        diffuse_modes.append(diffuse_mean * np.asarray(multiplier))
        specular_modes.append(specular_mean * float(np.mean(multiplier)))
        names.append(f"tone_{name}")
    eigenvectors = laplacian_modes(vertices, triangles, num_laplacian_modes)
    for k in range(num_laplacian_modes):
        sigma = LAPLACIAN_SIGMA / (1.0 + k / LAPLACIAN_DECAY)
        for channel, channel_name in enumerate("rgb"):
            mode = np.zeros((num_vertices, 3))
            mode[:, channel] = sigma * eigenvectors[:, k]
            diffuse_modes.append(mode)
            specular_modes.append(np.repeat(0.5 * sigma / np.sqrt(3.0) * eigenvectors[:, k : k + 1], 3, axis=1))
            names.append(f"laplacian{k + 1:02d}_{channel_name}")
    return {
        "albedo_mean": diffuse_mean.astype(np.float32),
        "albedo_basis": np.stack(diffuse_modes).astype(np.float32),
        "specular_mean": specular_mean.astype(np.float32),
        "specular_basis": np.stack(specular_modes).astype(np.float32),
        "albedo_mode_names": np.asarray(names),
    }


def laplacian_modes(vertices: np.ndarray, triangles: np.ndarray, count: int) -> np.ndarray:
    """The `count` lowest non-constant vibration modes (V,count) of the mesh, from the generalised
    eigenproblem L x = lambda M x, each scaled to unit root-mean-square over the vertices and with
    a deterministic sign (largest-magnitude entry positive)."""
    stiffness, areas = cotangent_laplacian(vertices.astype(np.float64), triangles)
    mass = sp.diags(areas)
    # a fixed start vector: ARPACK's default is random, which makes rebuilds differ in the last bits
    start = np.random.default_rng(0).standard_normal(len(vertices))
    values, vectors = spla.eigsh(stiffness, k=count + 1, M=mass, sigma=-1e-6, which="LM", v0=start)
    order = np.argsort(values)[1:]  # drop the constant mode
    vectors = vectors[:, order]
    vectors /= np.sqrt(np.mean(vectors**2, axis=0, keepdims=True))
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    return vectors * signs


def _smooth(values: np.ndarray, triangles: np.ndarray, steps: int) -> np.ndarray:
    """Umbrella smoothing of per-vertex values (V,C) over the mesh graph, `steps` times."""
    graph = adjacency(triangles, len(values))
    graph = sp.diags(1.0 / np.maximum(np.asarray(graph.sum(axis=1)).ravel(), 1)) @ graph
    for _ in range(steps):
        values = 0.5 * values + 0.5 * (graph @ values)
    return values
