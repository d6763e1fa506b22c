"""Image encoders behind one interface: ``encoder(batch) -> embeddings``.

An :class:`Encoder` takes uint8 N x H x W x 3 patches (what slide readers and patch
cutters give) or float32 N x 3 x H x W already in the model's pixel scale, applies the
one pixel transform (:mod:`mclx.inference.transform`) and returns the model's image
output: embeddings for a contrastive model, expression for ST-Net. A section-level
model (HisToGene) is called with a whole section and its array coordinates,
``encoder(batch, positions)``. Each says which
checkpoint it came from (``fingerprint``), how its pixels are prepared (``pre``) and
how it runs (``name``, ``precision``, ``device``).

- :class:`TorchEncoder`: the checkpoint's own model (fp32, without TF32 on a GPU; bf16
  on CPUs with AMX / AVX512-BF16; fp16 on CUDA).
- :class:`OnnxRuntimeEncoder`: an exported ``.onnx`` / ``.int8.onnx`` (CPU, or CUDA with
  its provider checked).
- :class:`~mclx.inference.tensorrt.TensorRTEncoder`: an engine (NVIDIA GPUs).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mclx.config import PreprocessCfg, from_dict
from mclx.errors import FormatError, short
from mclx.inference.device import (
    device_index,
    import_onnxruntime,
    is_cuda,
    onnxruntime_distributions,
)
from mclx.inference.transform import to_model_input, to_tensor

INPUT, OUTPUT = "images", "embeddings"  # tensor names of every exported encoder
POSITIONS = "positions"  # the second input of a section-level model (HisToGene)


class Encoder(Protocol):
    """What the runtime, evaluation and the exporter's parity check need of an encoder."""

    name: str  # backend: torch, onnxruntime, tensorrt
    pre: PreprocessCfg
    fingerprint: str  # the checkpoint's
    precision: str
    device: str

    def __call__(self, batch: Any) -> Any: ...


class TorchEncoder:
    """The checkpoint's own model in PyTorch.

    ``bf16`` on CPU runs a bfloat16 copy of the image encoder, channels-last, traced and
    frozen with TorchScript so that oneDNN fuses convolution, batch norm and ReLU: ~1.6x
    the speed of bf16 autocast in eager mode on an AMX machine. Its pooled features go
    to the head in float32: a standardisation (``--recipe default``) centres them and
    would leave bf16's rounding of the large shared component as most of what remains.
    """

    name = "torch"

    def __init__(
        self, ck, *, precision: str = "fp32", device: str = "cpu", region: bool = False
    ) -> None:
        import torch

        if precision not in ("fp32", "bf16", "fp16"):
            msg = f"torch backend: precision {precision!r} not offered (fp32, bf16, fp16)"
            raise ValueError(msg)
        if precision == "fp16" and not is_cuda(device):
            msg = "torch backend: fp16 needs --device cuda"
            raise ValueError(msg)
        if not region:  # the whole-slide runtime pools neighbourhoods (mclx.wsi.region)
            from mclx.training.context import require_none

            require_none(ck.model_cfg, ck.path, "an encoder of single patches (export, "
                         "evaluate --ckpt; mclx infer pools them from the checkpoint)")  # fmt: skip
        self.pre, self.precision, self.device = ck.preprocess, precision, device
        self.fingerprint = ck.fingerprint
        self.model = ck.model.to(device).eval().to(memory_format=torch.channels_last)
        self._frozen = None

    def warm_up(self) -> None:
        """The one-time work before the first batch, so that it is not timed as encoding:
        for bf16 on the CPU, the frozen TorchScript model (:func:`frozen_bf16`)."""
        section = getattr(self.model, "kind", "") == "section"  # HisToGene: eager, positions
        if (
            self.precision == "bf16"
            and self.device == "cpu"
            and self._frozen is None
            and not section
        ):
            trunk = self.model.image_encoder
            self._frozen = frozen_bf16(trunk, self.fingerprint, self.pre.patch_size)

    def _bf16_cpu(self, x):
        """The bf16 trunk, then the head (standardisation, projection) in float32."""
        from mclx.models.backbones import encode

        self.warm_up()
        return self.model.embed_image_features(encode(self._frozen, x.bfloat16()).float())

    def _context(self):
        """Autocast for bf16 / fp16; for fp32 on a GPU, no TF32 in cuDNN convolutions
        (PyTorch allows it by default, which would make "fp32" miss the 1e-4 bound)."""
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        kind = "cuda" if is_cuda(self.device) else "cpu"
        if dtype is not None:
            return torch.autocast(kind, dtype=dtype)
        return no_tf32() if kind == "cuda" else contextlib.nullcontext()

    def features(self, batch) -> np.ndarray:
        """The trunk's pooled features (N, V F) float32 of a batch: what the model's head
        reads (before its feature standardisation and any neighbourhood), per tile, each
        view's (:func:`~mclx.models.backbones.encode`), for a region step
        (:mod:`mclx.wsi.region`)."""
        import torch

        from mclx.models.backbones import encode

        x = to_tensor(np.asarray(batch), self.pre, self.device)
        section = getattr(self.model, "kind", "") == "section"
        with torch.inference_mode():
            if self.precision == "bf16" and self.device == "cpu" and not section:
                self.warm_up()
                return encode(self._frozen, x.bfloat16()).float().numpy()
            with self._context():
                return encode(self.model.image_encoder, x).float().cpu().numpy()

    def __call__(self, batch, positions=None):
        import torch

        x = to_tensor(np.asarray(batch), self.pre, self.device)
        args = (x,) if positions is None else (x, torch.as_tensor(positions, device=self.device))
        with torch.inference_mode():
            if self.precision == "bf16" and self.device == "cpu" and positions is None:
                return self._bf16_cpu(x).float().numpy()
            with self._context():
                return self.model(*args).float().cpu().numpy()


_FROZEN_VERSION = 2  # of the recipe below: bump when it changes, to retire cached files


def frozen_bf16(model, fingerprint: str, size: int):
    """A bfloat16 copy of ``model`` traced and frozen with TorchScript (channels-last
    input of ``size`` px), cached by checkpoint fingerprint and torch version in
    ``cache_dir("torchscript")``: tracing and freezing DenseNet-121 takes seconds to tens
    of seconds on 2 cores, loading the frozen file 0.2 s. An unreadable cache entry is
    rebuilt; an unwritable cache folder is skipped."""
    import copy
    import warnings

    import torch

    from mclx.cache import cache_dir
    from mclx.files import atomic_path

    key = f"{fingerprint}-bf16-v{_FROZEN_VERSION}-torch{torch.__version__.replace('+', '_')}"
    path = cache_dir("torchscript") / f"{key}.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings
        if fingerprint and path.is_file():
            with contextlib.suppress(Exception):  # torn or from another build: rebuild it
                return torch.jit.load(str(path), map_location="cpu")
        example = torch.zeros(2, 3, size, size, dtype=torch.bfloat16)
        example = example.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            model = copy.deepcopy(model).bfloat16()
            frozen = torch.jit.freeze(torch.jit.trace(model, example))
        if fingerprint:
            # serialised in memory, written by Python: torch's file writer aborts the
            # process (C++ terminate) when a write fails, e.g. at ulimit -f
            buffer = io.BytesIO()
            torch.jit.save(frozen, buffer)
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    tmp.write_bytes(buffer.getbuffer())
    return frozen


@contextlib.contextmanager
def no_tf32():
    """cuDNN convolutions in true float32 for the duration (process-wide setting)."""
    import torch

    cudnn = torch.backends.cudnn
    saved, cudnn.allow_tf32 = cudnn.allow_tf32, False
    try:
        yield
    finally:
        cudnn.allow_tf32 = saved


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The mclx metadata dict of an ONNX file (without loading its weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def onnx_metadata(path: Path) -> tuple[dict[str, str], PreprocessCfg]:
    """The validated metadata of an mclx ONNX encoder and its preprocessing."""
    from mclx.artifacts import require_file

    require_file(path, "ONNX file", nonempty=True)
    try:
        meta = read_onnx_metadata(path)
    except Exception as exc:  # protobuf DecodeError, ...
        from mclx.artifacts import describe_file

        what = describe_file(path)
        msg = f"{path}: not a readable ONNX file: the file is {what} ({short(exc, 80)})"
        raise FormatError(msg) from exc
    try:
        pre = from_dict(PreprocessCfg, json.loads(meta["preprocess"]))
        str(meta["fingerprint"])
    except Exception as exc:  # KeyError, ValueError
        msg = (
            f"{path}: not an mclx ONNX encoder (no valid mclx metadata: "
            f"{exc.__class__.__name__} {short(exc, 60)}); export it with 'mclx export'"
        )
        raise FormatError(msg) from exc
    return meta, pre


class OnnxRuntimeEncoder:
    """An exported ``.onnx`` (or ``.int8.onnx``) file in ONNX Runtime.

    On ``cuda`` / ``cuda:N`` the session must really run on that GPU: ONNX Runtime
    quietly falls back to the CPU when the CUDA or cuDNN libraries do not load, so the
    session's providers are checked and a fallback is one clear error.
    """

    name = "onnxruntime"

    def __init__(
        self, path: str | os.PathLike, *, device: str = "cpu", threads: int | None = None
    ) -> None:
        path = Path(path)
        ort = import_onnxruntime(str(path))
        meta, self.pre = onnx_metadata(path)
        self.fingerprint = meta["fingerprint"]
        self.precision = meta.get("precision", "fp32")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or os.cpu_count() or 1
        providers: list[Any] = ["CPUExecutionProvider"]
        if is_cuda(device):
            _require_cuda_provider(ort, path)
            # float32 convolutions without TF32 (on by default in the CUDA provider)
            options = {"device_id": device_index(device), "use_tf32": 0}
            cuda = ("CUDAExecutionProvider", options)
            providers = [cuda, "CPUExecutionProvider"]
        self.device, self.path = device, path
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # ORT's Fail, InvalidProtobuf, InvalidGraph: not OSError
            msg = f"{path}: ONNX Runtime cannot load the model ({short(exc, 200)})"
            raise FormatError(msg) from exc
        if is_cuda(device) and "CUDAExecutionProvider" not in self.session.get_providers():
            msg = (
                f"{path}: ONNX Runtime did not start its CUDA provider on {device} (the CUDA "
                f"13 / cuDNN 9 libraries did not load; the session would run on the CPU); "
                f"providers: {', '.join(self.session.get_providers())}"
            )
            raise RuntimeError(msg)

    def __call__(self, batch, positions=None):
        x = to_model_input(np.asarray(batch), self.pre)
        feed = {INPUT: x}
        if any(i.name == POSITIONS for i in self.session.get_inputs()):
            if positions is None:
                msg = f"{self.path}: a section-level model needs each spot's array positions"
                raise ValueError(msg)
            feed[POSITIONS] = np.ascontiguousarray(positions, dtype=np.int64)
        try:
            return self.session.run(None, feed)[0]
        except Exception as exc:  # InvalidArgument on a wrong input shape, ...
            msg = f"{self.path}: ONNX Runtime failed on a batch of {x.shape} ({short(exc, 200)})"
            raise RuntimeError(msg) from exc


def _require_cuda_provider(ort, path: Path) -> None:
    """One line when this ONNX Runtime has no CUDA provider, naming the usual cause: the
    CPU build installed beside (and over) onnxruntime-gpu."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        preload = getattr(ort, "preload_dlls", None)  # CUDA / cuDNN from the nvidia wheels
        if preload is not None:
            with contextlib.suppress(Exception):
                preload()
        return
    dists = onnxruntime_distributions()
    if len(dists) > 1:
        msg = (
            f"{path}: ONNX Runtime has no CUDA provider: {' and '.join(dists)} are both "
            f"installed and the CPU build hides the GPU one (pip uninstall -y {' '.join(dists)}"
            f" && pip install 'mclx[gpu]')"
        )
    else:
        msg = f"{path}: ONNX Runtime has no CUDA provider (pip install 'mclx[gpu]')"
    raise RuntimeError(msg)
