"""Stand-ins for ``tensorrt`` and ``cupy`` with the API shapes of the real libraries, so
that the GPU code paths run, and are checked, on a machine without a GPU.

- :func:`fake_tensorrt` (``major`` 10 or 11): the builder, ONNX parser, runtime, engine
  and execution context that mclx calls, with what differs between the two versions
  (TensorRT 11 has no ``BuilderFlag.FP16`` and no ``Builder.platform_has_fast_fp16``; its
  networks are always strongly typed). An "engine" is the ONNX graph it was built from
  plus a JSON header of how it was built; running it runs that graph in ONNX Runtime
  (CPU), so outputs are the real model's. The header's ``precision`` is what a strongly
  typed network computes in: ``fp16`` only when every Conv input of the graph is float16
  (:func:`conv_input_types`), whatever the weights' type, so an engine built from a graph
  that casts its float16 weights back to float32 is an FP32 engine here as on a GPU.
  Contexts return False where TensorRT does (a shape outside the profile) and on demand
  (``trt.fail``: also ``add_optimization_profile`` -1, ``set_timing_cache`` False,
  ``get_timing_cache`` and ``create_execution_context`` None).
- :func:`fake_cupy`: numpy-backed device arrays with ``data.ptr``, streams with the
  current-stream stack, events, devices; every allocation and copy is logged with the
  stream it was queued on (``cp.log``). ``from_dlpack`` refuses CPU arrays with CuPy's
  own message.
- :func:`install`: both in ``sys.modules`` (through ``monkeypatch``).
"""

from __future__ import annotations

import enum
import itertools
import json
import sys
import types
from pathlib import Path

import numpy as np

_ptrs = itertools.count(0x10000, 0x100)


# --- cupy -------------------------------------------------------------------------


class _Memory:
    def __init__(self) -> None:
        self.ptr = next(_ptrs)


class FakeCuPyArray:
    """A "device" array: a numpy array (or view) registered by pointer."""

    registry: dict[int, FakeCuPyArray] = {}

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.data = _Memory()
        FakeCuPyArray.registry[self.data.ptr] = self

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)
    ndim = property(lambda self: self.a.ndim)

    def __len__(self) -> int:
        return len(self.a)

    device = property(lambda self: types.SimpleNamespace(id=0))

    def __getitem__(self, key) -> FakeCuPyArray:
        return FakeCuPyArray(self.a[_host(key)])

    def __setitem__(self, key, value) -> None:
        self.a[_host(key)] = _host(value)

    def reshape(self, *shape) -> FakeCuPyArray:
        view = self.a.reshape(*shape)
        assert np.shares_memory(view, self.a), "reshape of a non-contiguous fake array"
        return FakeCuPyArray(view)

    def all(self):
        return self.a.all()

    def __array__(self, *args, **kwargs):
        msg = "Implicit conversion to a NumPy array is not allowed. Please use `.get()`"
        raise TypeError(msg)

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()

    def get(self) -> np.ndarray:
        return self.a.copy()

    def astype(self, dtype, copy=True) -> FakeCuPyArray:
        _op("astype")
        return FakeCuPyArray(self.a.astype(dtype))


def _host(x):
    return x.a if isinstance(x, FakeCuPyArray) else x


class _Event:
    def __init__(self, stream) -> None:
        self.stream = stream


class _Stream:
    def __init__(self, cp, non_blocking: bool = False, ptr: int | None = None) -> None:
        self.cp, self.ptr, self.non_blocking = cp, next(_ptrs) if ptr is None else ptr, non_blocking

    def __enter__(self):
        self.cp.cuda._stack.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.cp.cuda._stack.pop()

    def record(self, event=None):
        self.cp.log.append(("record", self.ptr))
        return _Event(self)

    def wait_event(self, event) -> None:
        self.cp.log.append(("wait", self.ptr, event.stream.ptr))

    def synchronize(self) -> None:
        self.cp.log.append(("synchronize", self.ptr))


class _Device:
    def __init__(self, cp, device: int | None = None) -> None:
        self.cp = cp
        self.id = cp.cuda._device[-1] if device is None else device

    @property
    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes: ``cp.free_bytes`` of an 80 GB GPU (a test may lower it)."""
        return self.cp.free_bytes, 80 * 10**9

    def __enter__(self):
        self.cp.cuda._device.append(self.id)
        return self

    def __exit__(self, *exc) -> None:
        self.cp.cuda._device.pop()


def _op(name: str) -> None:
    cp = sys.modules["cupy"]
    cp.log.append((name, cp.cuda.get_current_stream().ptr))


def fake_cupy(devices: int = 1) -> types.ModuleType:
    cp = types.ModuleType("cupy")
    cp.__version__ = "14.2.0-fake"
    cp.log = []
    cp.free_bytes = 70 * 10**9
    cp.ndarray = FakeCuPyArray
    cp.float32, cp.float16, cp.int32, cp.int64 = np.float32, np.float16, np.int32, np.int64
    cp.uint16 = np.uint16
    cuda = types.SimpleNamespace(_stack=[], _device=[0])
    null = _Stream(cp, ptr=0)
    cuda.Stream = lambda non_blocking=False: _Stream(cp, non_blocking)
    cuda.get_current_stream = lambda: cuda._stack[-1] if cuda._stack else null
    cuda.Device = lambda device=None: _Device(cp, device)
    cuda.runtime = types.SimpleNamespace(
        getDeviceCount=lambda: devices,
        getDeviceProperties=lambda i: {"name": b"Fake GPU", "major": 9, "minor": 0},
        runtimeGetVersion=lambda: 13000,
    )
    cp.cuda = cuda

    def asarray(x, dtype=None, order=None):
        _op("asarray")
        if isinstance(x, FakeCuPyArray):
            same = (dtype is None or x.dtype == dtype) and (order is None or x.a.flags.c_contiguous)
            return x if same else FakeCuPyArray(np.array(x.a, dtype=dtype, order=order or "K"))
        return FakeCuPyArray(np.array(x, dtype=dtype, order=order or "K"))

    def ascontiguousarray(x, dtype=None):
        _op("ascontiguousarray")
        return FakeCuPyArray(np.ascontiguousarray(x.a, dtype=dtype))

    def empty(shape, dtype=np.float32):
        _op("empty")
        return FakeCuPyArray(np.empty(shape, dtype))

    def concatenate(parts):
        _op("concatenate")
        return FakeCuPyArray(np.concatenate([p.a for p in parts]))

    def full(shape, value, dtype=np.float32):
        _op("full")
        return FakeCuPyArray(np.full(shape, value, dtype))

    def zeros(shape, dtype=np.float32):
        _op("zeros")
        return FakeCuPyArray(np.zeros(shape, dtype))

    cp.full, cp.zeros = full, zeros
    cp.isfinite = lambda x: FakeCuPyArray(np.isfinite(x.a))

    def from_dlpack(x):
        if x.__dlpack_device__()[0] == 1:  # kDLCPU: what CuPy 14.2 says
            msg = (
                "CPU arrays cannot be directly imported to CuPy. Use "
                "`cupy.array(numpy.from_dlpack(input))` instead."
            )
            raise TypeError(msg)
        raise NotImplementedError

    cp.asarray, cp.ascontiguousarray, cp.empty = asarray, ascontiguousarray, empty
    cp.concatenate, cp.from_dlpack = concatenate, from_dlpack
    return cp


# --- tensorrt ---------------------------------------------------------------------


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16}


class _Tensor:
    def __init__(self, name: str, shape, dtype) -> None:
        self.name, self.shape, self.dtype = name, tuple(shape), dtype


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags, self.onnx, self.inputs, self.outputs = flags, b"", [], []
        self.convs: list[tuple[str, ...]] = []
        self.graph_fp16 = False

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]


class _Parser:
    def __init__(self, network, logger) -> None:
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path) -> bool:
        import onnx

        model = onnx.load(str(path))
        elem = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF}

        def tensor(v):
            dims = [d.dim_value or -1 for d in v.type.tensor_type.shape.dim]
            return _Tensor(v.name, dims, elem[v.type.tensor_type.elem_type])

        self.network.onnx = Path(path).read_bytes()
        self.network.inputs = [tensor(v) for v in model.graph.input]
        self.network.outputs = [tensor(v) for v in model.graph.output]
        self.network.convs = conv_input_types(model)
        # what a strongly typed network computes in: the type of the Conv inputs, never
        # the weights' type (float16 weights cast to float32 make a float32 network)
        convs = {t for inputs in self.network.convs for t in inputs}
        self.network.graph_fp16 = convs == {"FLOAT16"}
        return True


def conv_input_types(model) -> list[tuple[str, ...]]:
    """The element types (``FLOAT16``, ``FLOAT``) of every Conv node's inputs (data,
    weight, bias), found by walking the graph from its inputs and initialisers: a Cast
    gives its ``to`` type, a Constant its tensor's, any other node its first typed
    input's (enough for the encoders' graphs; independent of ONNX's shape inference)."""
    import onnx

    name = onnx.TensorProto.DataType.Name
    types = {t.name: name(t.data_type) for t in model.graph.initializer}
    types |= {v.name: name(v.type.tensor_type.elem_type) for v in model.graph.input}
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if node.op_type == "Cast":
            out = name(next(a.i for a in node.attribute if a.name == "to"))
        elif node.op_type == "Constant":
            attr = node.attribute[0]
            tensor = attr.type == onnx.AttributeProto.TENSOR
            out = name(attr.t.data_type) if tensor else "FLOAT"
        else:
            out = next((types[i] for i in node.input if i in types), "UNDEFINED")
        for o in node.output:
            types[o] = out
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    return [tuple(types.get(i, "UNDEFINED") for i in n.input if i) for n in convs]


class _Profile:
    def __init__(self) -> None:
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi) -> None:
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            msg = f"set_shape: {name} needs min <= opt <= max ({lo}, {opt}, {hi})"
            raise ValueError(msg)
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _Cache:
    def serialize(self) -> bytes:
        return b"timing-cache"


class _Config:
    def __init__(self, trt) -> None:
        self.trt = trt
        self.flags = {trt.BuilderFlag.TF32}  # on by default in TensorRT 10 and 11
        self.profiles, self.cache, self.pool = [], None, {}

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag) -> bool:
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size) -> None:
        self.pool[pool] = size

    def add_optimization_profile(self, profile) -> int:
        if "add_optimization_profile" in self.trt.fail:
            return -1  # TensorRT's answer to an invalid profile
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes):
        return _Cache()

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        if "set_timing_cache" in self.trt.fail:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return None if "get_timing_cache" in self.trt.fail else self.cache


class _Builder:
    def __init__(self, trt, logger) -> None:
        self.trt, self.logger = trt, logger
        if trt.major == 10:
            self.platform_has_fast_fp16 = True

    def create_network(self, flags: int = 0):
        return _Network(flags)

    def create_builder_config(self):
        return _Config(self.trt)

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        trt = self.trt
        strong = trt.major >= 11 or bool(
            network.flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        )
        (profile,) = config.profiles
        header = {
            "major": trt.major,
            "strongly_typed": strong,
            "flags": sorted(f.name for f in config.flags),
            "graph_fp16": network.graph_fp16,
            "conv_types": sorted({t for inputs in network.convs for t in inputs}),
            # a strongly typed network computes in its graph's types: FP16 only when
            # every Conv takes float16 (the label this stand-in gives the engine)
            "precision": "fp16" if strong and network.graph_fp16 else "fp32",
            "profile": profile.shapes["images"],
            "out_dim": network.get_output(0).shape[-1],
        }
        trt.built.append(json.loads(json.dumps(header)))
        return json.dumps(header).encode() + b"\n" + network.onnx


class _Context:
    def __init__(self, engine) -> None:
        self.engine, self.shape, self.addresses = engine, None, {}

    def set_input_shape(self, name, shape) -> bool:
        lo, _, hi = self.engine.header["profile"]
        if not lo[0] <= shape[0] <= hi[0] or "set_input_shape" in self.engine.fail:
            self.engine.logger.log(self.engine.trt.ILogger.Severity.ERROR, f"bad shape {shape}")
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], self.engine.header["out_dim"])

    def set_tensor_address(self, name, ptr) -> bool:
        self.addresses[name] = ptr
        return "set_tensor_address" not in self.engine.fail

    def execute_async_v3(self, stream_ptr: int) -> bool:
        cp = sys.modules["cupy"]
        cp.log.append(("execute", stream_ptr))
        if "execute_async_v3" in self.engine.fail:
            return False
        x = FakeCuPyArray.registry[self.addresses["images"]].a
        y = FakeCuPyArray.registry[self.addresses["embeddings"]].a
        assert x.shape == self.shape, "input buffer differs from the shape set"
        y[...] = self.engine.session.run(None, {"images": x.astype(np.float32)})[0]
        return True


class _Engine:
    out_dtype = DataType.FLOAT  # a test may make it HALF

    def __init__(self, trt, logger, data: bytes) -> None:
        import onnxruntime as ort

        head, graph = data.split(b"\n", 1)
        self.trt, self.logger, self.header = trt, logger, json.loads(head)
        self.session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        self.fail: set[str] = set(trt.fail)

    def get_tensor_profile_shape(self, name, index):
        return [list(s) for s in self.header["profile"]]

    def get_tensor_dtype(self, name):
        return self.out_dtype if name == "embeddings" else DataType.FLOAT

    def get_tensor_shape(self, name):
        return (-1, self.header["out_dim"])

    def create_execution_context(self):
        if "create_execution_context" in self.fail:
            return None  # TensorRT's answer when it cannot (device memory)
        return _Context(self)


class _Runtime:
    def __init__(self, trt, logger) -> None:
        self.trt, self.logger = trt, logger

    def deserialize_cuda_engine(self, data: bytes):
        try:
            return _Engine(self.trt, self.logger, bytes(data))
        except Exception:
            self.logger.log(self.trt.ILogger.Severity.ERROR, "not an engine")
            return None


def fake_tensorrt(major: int) -> types.ModuleType:
    """A ``tensorrt`` module with the API shape of TensorRT ``major`` (10 or 11)."""
    trt = types.ModuleType("tensorrt")
    trt.major = major
    trt.__version__ = {10: "10.16.1.11", 11: "11.4.0.106"}[major]
    trt.built, trt.fail = [], set()
    flags = ["TF32", "GPU_FALLBACK", "DISABLE_TIMING_CACHE"]
    if major == 10:
        flags += ["FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]
    trt.BuilderFlag = enum.Enum("BuilderFlag", flags)
    net_flags = {"STRONGLY_TYPED": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}
    if major == 10:
        net_flags["EXPLICIT_BATCH"] = 0
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", net_flags)
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    trt.DataType, trt.float32, trt.float16 = DataType, DataType.FLOAT, DataType.HALF
    trt.nptype = lambda t: _NP[t]

    class ILogger:
        Severity = enum.IntEnum(
            "Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"], start=0
        )

        def __init__(self) -> None:
            pass

    trt.ILogger = ILogger
    trt.Logger = ILogger
    trt.Builder = lambda logger: _Builder(trt, logger)
    trt.OnnxParser = _Parser
    trt.Runtime = lambda logger: _Runtime(trt, logger)
    return trt


def install(monkeypatch, trt_major: int | None = 11, devices: int = 1):
    """Put a fake ``cupy`` (and a fake ``tensorrt`` of ``trt_major``, unless None) in
    ``sys.modules``; returns ``(trt, cp)``."""
    cp = fake_cupy(devices)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    trt = None
    if trt_major is not None:
        trt = fake_tensorrt(trt_major)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
    FakeCuPyArray.registry.clear()
    return trt, cp
