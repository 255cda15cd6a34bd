"""Compiled CPU loops behind :mod:`facelab.render.numba_ops` (numba; imported only when used).

Each loop computes one primitive of :mod:`facelab.render.rasterize` per pixel (or per triangle)
in a single pass, forward and backward, instead of the dozens of whole-image temporaries the
vectorised reference allocates. Work is split into jobs (an image, or a band of rows of one when
the batch is smaller than the thread count); backward passes scatter into one accumulator per job,
summed afterwards, so no two threads write the same memory.

Conventions as in ``rasterize``: screen pixels with row 0 at the top and centres at +0.5, ndc
x = 2 (col + 0.5) / W - 1, ndc y = 1 - 2 (row + 0.5) / H.
"""

from __future__ import annotations

import numba
import numpy as np

DEPTH_LEVELS = 2**31 - 1
NO_HIT = np.iinfo(np.int64).max

_jit = dict(parallel=True, cache=True, nogil=True)


# ---------------------------------------------------------------------------------------------
# visibility


@numba.njit(cache=True)
def _edge_row(sx, sy, ex, ey, inverse):  # pragma: no cover - compiled
    """(a, b, c) of the barycentric weight whose opposite edge runs (sx, sy) -> (ex, ey)."""
    edge_x, edge_y = ex - sx, ey - sy
    return -edge_y * inverse, edge_x * inverse, (edge_y * sx - edge_x * sy) * inverse


@numba.njit(cache=True)
def _triangle(pos, tri, image, triangle, height, width):  # pragma: no cover - compiled
    """One triangle's plane rows (a, b, c) for its three barycentric weights and its depth (four
    3-tuples), its pixel bounding box (x0, y0, columns, rows) and whether it is drawn; float32 in
    the torch reference's operation order (``rasterize._plane_coefficients``), so both give the
    same bits."""
    half_w, half_h = np.float32(0.5 * width), np.float32(0.5 * height)
    one, half, tiny, zero = np.float32(1.0), np.float32(0.5), np.float32(1e-8), np.float32(0.0)
    nothing = (zero, zero, zero)
    i0, i1, i2 = tri[triangle, 0], tri[triangle, 1], tri[triangle, 2]
    w0, w1, w2 = pos[image, i0, 3], pos[image, i1, 3], pos[image, i2, 3]
    if not (w0 > tiny and w1 > tiny and w2 > tiny):
        return nothing, nothing, nothing, nothing, 0, 0, 0, 0, False
    x0, y0 = (pos[image, i0, 0] / w0 + one) * half_w, (one - pos[image, i0, 1] / w0) * half_h
    x1, y1 = (pos[image, i1, 0] / w1 + one) * half_w, (one - pos[image, i1, 1] / w1) * half_h
    x2, y2 = (pos[image, i2, 0] / w2 + one) * half_w, (one - pos[image, i2, 1] / w2) * half_h
    area = (x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)
    if not abs(area) > np.float32(1e-12):
        return nothing, nothing, nothing, nothing, 0, 0, 0, 0, False
    inverse = one / area
    # the weight of corner r is the edge function of the opposite edge (r+1 -> r+2) / area
    r0 = _edge_row(x1, y1, x2, y2, inverse)
    r1 = _edge_row(x2, y2, x0, y0, inverse)
    r2 = _edge_row(x0, y0, x1, y1, inverse)
    z0, z1, z2 = pos[image, i0, 2] / w0, pos[image, i1, 2] / w1, pos[image, i2, 2] / w2
    r3 = (r0[0] * z0 + r1[0] * z1 + r2[0] * z2, r0[1] * z0 + r1[1] * z1 + r2[1] * z2,
          r0[2] * z0 + r1[2] * z1 + r2[2] * z2)
    for row in (r0, r1, r2, r3):
        if not (np.isfinite(row[0]) and np.isfinite(row[1]) and np.isfinite(row[2])):
            return nothing, nothing, nothing, nothing, 0, 0, 0, 0, False
    x_lo = max(np.ceil(min(x0, min(x1, x2)) - half), zero)
    y_lo = max(np.ceil(min(y0, min(y1, y2)) - half), zero)
    x_hi = min(np.floor(max(x0, max(x1, x2)) - half), np.float32(width - 1))
    y_hi = min(np.floor(max(y0, max(y1, y2)) - half), np.float32(height - 1))
    columns = max(np.int64(x_hi - x_lo + one), 0)
    rows = max(np.int64(y_hi - y_lo + one), 0)
    return r0, r1, r2, r3, np.int64(x_lo), np.int64(y_lo), columns, rows, True


@numba.njit(**_jit)
def zbuffer(pos, tri, height, width, bands):  # pragma: no cover - compiled
    """Nearest triangle id per pixel (B,H,W) int64, -1 for background: the quantised depth above
    the triangle id as one key, the smallest key wins (ties go to the lower id). pos: (B,V,4)
    float32 clip space; a job is one band of rows of one image."""
    batch, n_triangles = pos.shape[0], tri.shape[0]
    ids = np.full((batch, height, width), -1, np.int64)
    band_rows = (height + bands - 1) // bands
    half, one = np.float32(0.5), np.float32(1.0)
    levels = np.float32(DEPTH_LEVELS)
    for job in numba.prange(batch * bands):
        image = job // bands
        row_start = (job % bands) * band_rows
        row_end = min(height, row_start + band_rows)
        keys = np.full((max(row_end - row_start, 0), width), NO_HIT, np.int64)
        for triangle in range(n_triangles):
            r0, r1, r2, r3, x_lo, y_lo, columns, rows, drawn = _triangle(pos, tri, image, triangle, height, width)
            if not drawn:
                continue
            for y in range(max(y_lo, row_start), min(y_lo + rows, row_end)):
                py = np.float32(y) + half
                for x in range(x_lo, x_lo + columns):
                    px = np.float32(x) + half
                    if (r0[0] * px + r0[1] * py + r0[2] < 0 or r1[0] * px + r1[1] * py + r1[2] < 0
                            or r2[0] * px + r2[1] * py + r2[2] < 0):
                        continue
                    depth = r3[0] * px + r3[1] * py + r3[2]
                    if abs(depth) > one:
                        continue
                    quantised = np.int64((depth + one) * half * levels)
                    quantised = min(max(quantised, 0), DEPTH_LEVELS)
                    key = (quantised << 32) | triangle
                    if key < keys[y - row_start, x]:
                        keys[y - row_start, x] = key
        for y in range(row_start, row_end):
            for x in range(width):
                key = keys[y - row_start, x]
                if key != NO_HIT:
                    ids[image, y, x] = key & 0xFFFFFFFF
    return ids


# ---------------------------------------------------------------------------------------------
# barycentrics
#
# The perspective-correct barycentrics b of pixel centre (px, py) (ndc) solve
#   sum_i b_i (x_i - px w_i) = 0,  sum_i b_i (y_i - py w_i) = 0,  sum_i b_i = 1
# in clip space, so b = m / sum(m) with m = a x c, a_i = x_i - px w_i, c_i = y_i - py w_i; depth
# z/w = sum b_i z_i / sum b_i w_i. Both are smooth in the corners, which makes the backward pass
# a few lines. Computed in float64 (no cancellation trouble at w ~ 1e3), stored as the input dtype.


@numba.njit(cache=True)
def _homogeneous(pos, image, vertex, px, py):  # pragma: no cover - compiled
    w = np.float64(pos[image, vertex, 3])
    return pos[image, vertex, 0] - px * w, pos[image, vertex, 1] - py * w


@numba.njit(cache=True)
def _solve(pos, image, tri, triangle, px, py):  # pragma: no cover - compiled
    """(a, c, m, depth, denominator) for one pixel: a, c, m as above (3-tuples), depth z/w and
    the denominator sum_i b_i w_i of it."""
    i0, i1, i2 = tri[triangle, 0], tri[triangle, 1], tri[triangle, 2]
    a0, c0 = _homogeneous(pos, image, i0, px, py)
    a1, c1 = _homogeneous(pos, image, i1, px, py)
    a2, c2 = _homogeneous(pos, image, i2, px, py)
    m0, m1, m2 = a1 * c2 - a2 * c1, a2 * c0 - a0 * c2, a0 * c1 - a1 * c0
    total = m0 + m1 + m2
    b0, b1, b2 = m0 / total, m1 / total, m2 / total
    numerator = b0 * pos[image, i0, 2] + b1 * pos[image, i1, 2] + b2 * pos[image, i2, 2]
    denominator = b0 * pos[image, i0, 3] + b1 * pos[image, i1, 3] + b2 * pos[image, i2, 3]
    return (a0, a1, a2), (c0, c1, c2), (b0, b1, b2), total, numerator / denominator, denominator


@numba.njit(**_jit)
def barycentrics_forward(pos, tri, ids, out):  # pragma: no cover - compiled
    """out: (B,H,W,4), any values; receives (u, v, z/w, id + 1), zeros where ids < 0."""
    batch, height, width = ids.shape
    for row_job in numba.prange(batch * height):
        image, y = row_job // height, row_job % height
        py = 1.0 - 2.0 * (y + 0.5) / height
        for x in range(width):
            triangle = ids[image, y, x]
            if triangle < 0:
                for channel in range(4):
                    out[image, y, x, channel] = 0
                continue
            px = 2.0 * (x + 0.5) / width - 1.0
            _, _, b, _, depth, _ = _solve(pos, image, tri, triangle, px, py)
            out[image, y, x, 0] = b[1]
            out[image, y, x, 1] = b[2]
            out[image, y, x, 2] = depth
            out[image, y, x, 3] = triangle + 1


@numba.njit(**_jit)
def barycentrics_backward(pos, tri, ids, grad_rast, bands, accumulator):  # pragma: no cover - compiled
    """accumulator: (B*bands,V,4) zeros; receives d loss / d pos per job."""
    batch, height, width = ids.shape
    band_rows = (height + bands - 1) // bands
    for job in numba.prange(batch * bands):
        image = job // bands
        row_start = (job % bands) * band_rows
        for y in range(row_start, min(height, row_start + band_rows)):
            py = 1.0 - 2.0 * (y + 0.5) / height
            for x in range(width):
                triangle = ids[image, y, x]
                if triangle < 0:
                    continue
                grad_u, grad_v = np.float64(grad_rast[image, y, x, 0]), np.float64(grad_rast[image, y, x, 1])
                grad_depth = np.float64(grad_rast[image, y, x, 2])
                if grad_u == 0 and grad_v == 0 and grad_depth == 0:
                    continue
                px = 2.0 * (x + 0.5) / width - 1.0
                a, c, b, total, depth, denominator = _solve(pos, image, tri, triangle, px, py)
                i0, i1, i2 = tri[triangle, 0], tri[triangle, 1], tri[triangle, 2]
                # depth = sum b_i z_i / sum b_i w_i
                scale = grad_depth / denominator
                grad_b0 = scale * (pos[image, i0, 2] - depth * pos[image, i0, 3])
                grad_b1 = grad_u + scale * (pos[image, i1, 2] - depth * pos[image, i1, 3])
                grad_b2 = grad_v + scale * (pos[image, i2, 2] - depth * pos[image, i2, 3])
                for corner, vertex in ((0, i0), (1, i1), (2, i2)):
                    accumulator[job, vertex, 2] += scale * b[corner]
                    accumulator[job, vertex, 3] -= scale * depth * b[corner]
                # b = m / sum(m)
                mean = grad_b0 * b[0] + grad_b1 * b[1] + grad_b2 * b[2]
                grad_m = ((grad_b0 - mean) / total, (grad_b1 - mean) / total, (grad_b2 - mean) / total)
                # m = a x c: d/da = c x grad_m, d/dc = grad_m x a
                for corner, vertex in ((0, i0), (1, i1), (2, i2)):
                    nxt, prv = (corner + 1) % 3, (corner + 2) % 3
                    grad_a = c[nxt] * grad_m[prv] - c[prv] * grad_m[nxt]
                    grad_c = grad_m[nxt] * a[prv] - grad_m[prv] * a[nxt]
                    accumulator[job, vertex, 0] += grad_a
                    accumulator[job, vertex, 1] += grad_c
                    accumulator[job, vertex, 3] -= px * grad_a + py * grad_c


# ---------------------------------------------------------------------------------------------
# interpolation


@numba.njit(**_jit)
def interpolate_forward(attr, rast, tri, out):  # pragma: no cover - compiled
    """attr: (B|1,V,C); out: (B,H,W,C), any values; zeros on background."""
    batch, height, width, channels = out.shape
    shared = attr.shape[0] == 1
    for row_job in numba.prange(batch * height):
        image, y = row_job // height, row_job % height
        source = 0 if shared else image
        for x in range(width):
            triangle = np.int64(rast[image, y, x, 3]) - 1
            if triangle < 0:
                for channel in range(channels):
                    out[image, y, x, channel] = 0
                continue
            u, v = rast[image, y, x, 0], rast[image, y, x, 1]
            w0 = 1 - u - v
            v0, v1, v2 = tri[triangle, 0], tri[triangle, 1], tri[triangle, 2]
            for channel in range(channels):
                out[image, y, x, channel] = (w0 * attr[source, v0, channel] + u * attr[source, v1, channel]
                                             + v * attr[source, v2, channel])


@numba.njit(**_jit)
def interpolate_backward(attr, rast, tri, grad_out, bands, accumulator, grad_rast):  # pragma: no cover
    """accumulator: (B*bands,V,C) zeros (d loss / d attr per job); grad_rast: (B,H,W,4), any
    values; receives d loss / d (u, v) and zeros elsewhere."""
    batch, height, width, channels = grad_out.shape
    shared = attr.shape[0] == 1
    band_rows = (height + bands - 1) // bands
    for job in numba.prange(batch * bands):
        image = job // bands
        source = 0 if shared else image
        row_start = (job % bands) * band_rows
        for y in range(row_start, min(height, row_start + band_rows)):
            for x in range(width):
                triangle = np.int64(rast[image, y, x, 3]) - 1
                for channel in range(4):
                    grad_rast[image, y, x, channel] = 0
                if triangle < 0:
                    continue
                u, v = rast[image, y, x, 0], rast[image, y, x, 1]
                w0 = 1 - u - v
                v0, v1, v2 = tri[triangle, 0], tri[triangle, 1], tri[triangle, 2]
                grad_u, grad_v = 0.0, 0.0
                for channel in range(channels):
                    g = grad_out[image, y, x, channel]
                    accumulator[job, v0, channel] += w0 * g
                    accumulator[job, v1, channel] += u * g
                    accumulator[job, v2, channel] += v * g
                    base = attr[source, v0, channel]
                    grad_u += g * (attr[source, v1, channel] - base)
                    grad_v += g * (attr[source, v2, channel] - base)
                grad_rast[image, y, x, 0] = grad_u
                grad_rast[image, y, x, 1] = grad_v


# ---------------------------------------------------------------------------------------------
# antialias


@numba.njit(**_jit)
def silhouette_edges(screen, valid, tri, edge_of_corner, edge_count):  # pragma: no cover - compiled
    """(B,T,3) bool as ``rasterize._silhouette_edges``: fewer than two drawn triangles on the
    edge, or drawn triangles of both screen windings."""
    batch, n_triangles = screen.shape[0], tri.shape[0]
    flags = np.zeros((batch, n_triangles, 3), np.bool_)
    for image in numba.prange(batch):
        drawn_count = np.zeros(edge_count, np.int32)
        forward_count = np.zeros(edge_count, np.int32)
        drawn = np.zeros(n_triangles, np.bool_)
        for triangle in range(n_triangles):
            i0, i1, i2 = tri[triangle, 0], tri[triangle, 1], tri[triangle, 2]
            winding = ((screen[image, i1, 0] - screen[image, i0, 0]) * (screen[image, i2, 1] - screen[image, i0, 1])
                       - (screen[image, i1, 1] - screen[image, i0, 1]) * (screen[image, i2, 0] - screen[image, i0, 0]))
            is_drawn = valid[image, i0] and valid[image, i1] and valid[image, i2] and winding != 0
            drawn[triangle] = is_drawn
            if is_drawn:
                for corner in range(3):
                    edge = edge_of_corner[triangle, corner]
                    drawn_count[edge] += 1
                    if winding > 0:
                        forward_count[edge] += 1
        for triangle in range(n_triangles):
            for corner in range(3):
                edge = edge_of_corner[triangle, corner]
                mixed = forward_count[edge] > 0 and forward_count[edge] < drawn_count[edge]
                flags[image, triangle, corner] = drawn_count[edge] < 2 or mixed
    return flags


@numba.njit(cache=True, inline="always")
def _blend(ids, depth, screen, tri, silhouette, has_silhouette, image, axis, ya, xa):  # pragma: no cover
    """The blend across the pixel pair (ya, xa) and its neighbour below (axis 0) or to the right
    (axis 1), if the pair straddles a silhouette edge of the nearer ("front") pixel's triangle:
    (blends, target_y, target_x, source_y, source_x, t, front, edge, start, end). The target
    pixel takes |t - 0.5| of (source colour - its own): the far pixel when the edge lies beyond
    the midpoint (t > 0.5), else the front pixel. start and end are the pixel centres (x, y)
    of the front and the other pixel; t is where the segment between them leaves the front
    triangle, through edge `edge`."""
    yb, xb = (ya + 1, xa) if axis == 0 else (ya, xa + 1)
    nothing = (False, 0, 0, 0, 0, 0.5, 0, 0, (0.0, 0.0), (0.0, 0.0))
    id_a, id_b = ids[image, ya, xa], ids[image, yb, xb]
    if id_a == id_b:
        return nothing
    a_front = id_a >= 0 and (id_b < 0 or depth[image, ya, xa] < depth[image, yb, xb])
    yf, xf, yo, xo = (ya, xa, yb, xb) if a_front else (yb, xb, ya, xa)
    front = ids[image, yf, xf]
    if not has_silhouette[image, front]:
        return nothing
    start, end = (xf + 0.5, yf + 0.5), (xo + 0.5, yo + 0.5)
    t, edge = _exit(screen, image, tri, front, start, end)
    if not (np.isfinite(t) and silhouette[image, front, edge]) or t == 0.5:
        return nothing
    if t > 0.5:
        return True, yo, xo, yf, xf, t, front, edge, start, end
    return True, yf, xf, yo, xo, t, front, edge, start, end


@numba.njit(cache=True)
def _edge_function(screen, image, start_vertex, end_vertex, point):  # pragma: no cover - compiled
    """(q - o) x (p - o) for the edge o -> q and a point p (unoriented)."""
    ox, oy = screen[image, start_vertex, 0], screen[image, start_vertex, 1]
    return ((screen[image, end_vertex, 0] - ox) * (point[1] - oy)
            - (screen[image, end_vertex, 1] - oy) * (point[0] - ox))


@numba.njit(cache=True)
def _exit(screen, image, tri, triangle, start, end):  # pragma: no cover - compiled
    """Where the segment start -> end ((x, y) pixels) leaves the triangle: (t, edge) with t = inf
    when it does not; edge k joins corners k and k+1."""
    i0, i1, i2 = tri[triangle, 0], tri[triangle, 1], tri[triangle, 2]
    area = ((screen[image, i1, 0] - screen[image, i0, 0]) * (screen[image, i2, 1] - screen[image, i0, 1])
            - (screen[image, i1, 1] - screen[image, i0, 1]) * (screen[image, i2, 0] - screen[image, i0, 0]))
    orientation = 1.0 if area > 0 else (-1.0 if area < 0 else 0.0)
    best, best_edge = np.inf, 0
    for edge in range(3):
        start_vertex, end_vertex = tri[triangle, edge], tri[triangle, (edge + 1) % 3]
        e_start = _edge_function(screen, image, start_vertex, end_vertex, start)
        e_end = _edge_function(screen, image, start_vertex, end_vertex, end)
        if orientation * e_start >= 0 and orientation * e_end < 0:
            t = e_start / (e_start - e_end)
            if t < best:
                best, best_edge = t, edge
    return best, best_edge


@numba.njit(**_jit)
def antialias_forward(color, ids, depth, screen, tri, silhouette, has_silhouette, out):  # pragma: no cover
    """out: a copy of color; pixel pairs across silhouette edges blend by the edge position."""
    batch, height, width, channels = color.shape
    for image in numba.prange(batch):
        for axis in range(2):
            for ya in range(height - 1 if axis == 0 else height):
                for xa in range(width if axis == 0 else width - 1):
                    blends, ty, tx, sy, sx, t, _, _, _, _ = _blend(ids, depth, screen, tri, silhouette,
                                                                   has_silhouette, image, axis, ya, xa)
                    if not blends:
                        continue
                    spill = abs(t - 0.5)
                    for channel in range(channels):
                        out[image, ty, tx, channel] += spill * (color[image, sy, sx, channel] - color[image, ty, tx, channel])


@numba.njit(**_jit)
def antialias_backward(color, ids, depth, screen, tri, silhouette, has_silhouette, grad_out,
                       grad_color, grad_screen):  # pragma: no cover - compiled
    """grad_color: a copy of grad_out; grad_screen: (B,V,2) zeros."""
    batch, height, width, channels = color.shape
    for image in numba.prange(batch):
        for axis in range(2):
            for ya in range(height - 1 if axis == 0 else height):
                for xa in range(width if axis == 0 else width - 1):
                    blends, ty, tx, sy, sx, t, front, edge, start, end = _blend(
                        ids, depth, screen, tri, silhouette, has_silhouette, image, axis, ya, xa)
                    if not blends:
                        continue
                    # out_target += |t - 0.5| (c_source - c_target)
                    spill = abs(t - 0.5)
                    grad_spill = 0.0
                    for channel in range(channels):
                        g = grad_out[image, ty, tx, channel]
                        grad_color[image, sy, sx, channel] += spill * g
                        grad_color[image, ty, tx, channel] -= spill * g
                        grad_spill += g * (color[image, sy, sx, channel] - color[image, ty, tx, channel])
                    grad_t = grad_spill if t > 0.5 else -grad_spill
                    if grad_t == 0:
                        continue
                    # t = e_start / (e_start - e_end), e(p) = (q - o) x (p - o) for the crossed edge o -> q
                    start_vertex, end_vertex = tri[front, edge], tri[front, (edge + 1) % 3]
                    e_start = _edge_function(screen, image, start_vertex, end_vertex, start)
                    e_end = _edge_function(screen, image, start_vertex, end_vertex, end)
                    difference = e_start - e_end
                    ox, oy = screen[image, start_vertex, 0], screen[image, start_vertex, 1]
                    qx, qy = screen[image, end_vertex, 0], screen[image, end_vertex, 1]
                    # de/do = (q_y - p_y, p_x - q_x), de/dq = (p_y - o_y, o_x - p_x)
                    for point, g in ((start, -e_end / (difference * difference) * grad_t),
                                     (end, e_start / (difference * difference) * grad_t)):
                        grad_screen[image, start_vertex, 0] += g * (qy - point[1])
                        grad_screen[image, start_vertex, 1] += g * (point[0] - qx)
                        grad_screen[image, end_vertex, 0] += g * (point[1] - oy)
                        grad_screen[image, end_vertex, 1] += g * (ox - point[0])


# ---------------------------------------------------------------------------------------------
# vertex normals


@numba.njit(**_jit)
def vertex_normals_forward(vertices, tri, raw, normals):  # pragma: no cover - compiled
    """raw, normals: (B,V,3) zeros; raw receives the area-weighted sums of face normals, normals
    their unit vectors."""
    batch, count = vertices.shape[0], vertices.shape[1]
    for image in numba.prange(batch):
        for triangle in range(tri.shape[0]):
            i0, i1, i2 = tri[triangle, 0], tri[triangle, 1], tri[triangle, 2]
            ax, ay, az = (vertices[image, i1, 0] - vertices[image, i0, 0], vertices[image, i1, 1] - vertices[image, i0, 1],
                          vertices[image, i1, 2] - vertices[image, i0, 2])
            bx, by, bz = (vertices[image, i2, 0] - vertices[image, i0, 0], vertices[image, i2, 1] - vertices[image, i0, 1],
                          vertices[image, i2, 2] - vertices[image, i0, 2])
            fx, fy, fz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
            for vertex in (i0, i1, i2):
                raw[image, vertex, 0] += fx
                raw[image, vertex, 1] += fy
                raw[image, vertex, 2] += fz
        for vertex in range(count):
            length = max(np.sqrt(raw[image, vertex, 0] ** 2 + raw[image, vertex, 1] ** 2 + raw[image, vertex, 2] ** 2),
                         1e-12)
            for axis in range(3):
                normals[image, vertex, axis] = raw[image, vertex, axis] / length


@numba.njit(**_jit)
def vertex_normals_backward(vertices, tri, raw, normals, grad_normals, grad_vertices):  # pragma: no cover
    """grad_vertices: (B,V,3) zeros."""
    batch, count = vertices.shape[0], vertices.shape[1]
    for image in numba.prange(batch):
        grad_raw = np.empty((count, 3))
        for vertex in range(count):
            length = np.sqrt(raw[image, vertex, 0] ** 2 + raw[image, vertex, 1] ** 2 + raw[image, vertex, 2] ** 2)
            if length <= 1e-12:  # below the clamp the normal is raw / 1e-12: linear
                for axis in range(3):
                    grad_raw[vertex, axis] = grad_normals[image, vertex, axis] / 1e-12
                continue
            along = (grad_normals[image, vertex, 0] * normals[image, vertex, 0]
                     + grad_normals[image, vertex, 1] * normals[image, vertex, 1]
                     + grad_normals[image, vertex, 2] * normals[image, vertex, 2])
            for axis in range(3):
                grad_raw[vertex, axis] = (grad_normals[image, vertex, axis] - along * normals[image, vertex, axis]) / length
        for triangle in range(tri.shape[0]):
            i0, i1, i2 = tri[triangle, 0], tri[triangle, 1], tri[triangle, 2]
            gx = grad_raw[i0, 0] + grad_raw[i1, 0] + grad_raw[i2, 0]
            gy = grad_raw[i0, 1] + grad_raw[i1, 1] + grad_raw[i2, 1]
            gz = grad_raw[i0, 2] + grad_raw[i1, 2] + grad_raw[i2, 2]
            ax, ay, az = (vertices[image, i1, 0] - vertices[image, i0, 0], vertices[image, i1, 1] - vertices[image, i0, 1],
                          vertices[image, i1, 2] - vertices[image, i0, 2])
            bx, by, bz = (vertices[image, i2, 0] - vertices[image, i0, 0], vertices[image, i2, 1] - vertices[image, i0, 1],
                          vertices[image, i2, 2] - vertices[image, i0, 2])
            # f = a x b: d/da = b x g, d/db = g x a
            dax, day, daz = by * gz - bz * gy, bz * gx - bx * gz, bx * gy - by * gx
            dbx, dby, dbz = gy * az - gz * ay, gz * ax - gx * az, gx * ay - gy * ax
            grad_vertices[image, i1, 0] += dax
            grad_vertices[image, i1, 1] += day
            grad_vertices[image, i1, 2] += daz
            grad_vertices[image, i2, 0] += dbx
            grad_vertices[image, i2, 1] += dby
            grad_vertices[image, i2, 2] += dbz
            grad_vertices[image, i0, 0] -= dax + dbx
            grad_vertices[image, i0, 1] -= day + dby
            grad_vertices[image, i0, 2] -= daz + dbz
