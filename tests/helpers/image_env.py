"""A stand-in for the bare CUDA image the GPU machines run (docs/gpu.md): a fresh venv
that sees only the image's packages, taken from this interpreter's own installs, so that
the offline wheel set (``toolkit/gpu_check/wheels.txt``) is proven complete without a
GPU and without downloading torch.

The image's packages (:data:`IMAGE`, their dependencies followed through the installed
metadata) are linked one by one, files and dist-info, into a folder that a ``.pth`` file
puts on the venv's path; nothing else of this environment is visible there (mclx, anndata
and scanpy in particular), so a module missing from the wheel set fails to import. The
CUDA builds of the image (torch cu130, cupy-cuda13x, numba-cuda) are stood in for by the
builds installed here (torch CPU or CUDA; no CuPy: the checks skip it, as they would).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "toolkit" / "gpu_check" / "wheels.txt"

# what the image holds (issue 26), by distribution name; "numba" stands in for numba-cuda
IMAGE = (
    "torch", "torchvision", "numpy", "pandas", "scipy", "scikit-learn", "scikit-image",
    "h5py", "tifffile", "pillow", "matplotlib", "click", "tqdm", "rich", "pytest",
    "pytest-benchmark", "timm", "onnx", "onnxruntime", "numba",
)  # fmt: skip


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names=IMAGE) -> list[metadata.Distribution]:
    """The installed distributions ``names`` and, through their metadata, everything they
    need on this platform (extras not followed)."""
    env = {"extra": ""}
    todo, seen, found = [_norm(n) for n in names], set(), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (an optional dependency of the image's build)
        found.append(dist)
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(_norm(req.name))
    return found


def _top_level(dist: metadata.Distribution) -> set[str]:
    """The top-level files and folders a distribution installed into site-packages."""
    tops = set()
    for f in dist.files or ():
        parts = Path(str(f)).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].endswith(".pth"):
            tops.add(parts[0])
    return tops


def link_image(folder: Path) -> list[str]:
    """Link the image's packages into ``folder``; their names."""
    folder.mkdir(parents=True, exist_ok=True)
    dists = closure()
    for dist in dists:
        base = Path(str(dist.locate_file("")))
        for top in _top_level(dist):
            src, dst = base / top, folder / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return sorted(_norm(d.metadata["Name"]) for d in dists)


def make_venv(path: Path) -> Path:
    """A venv at ``path`` without pip whose only packages are the image's; its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    link_image(path / "image")
    (Path(purelib) / "image.pth").write_text(str(path / "image") + "\n")
    return python


def env_without_user_site(target: Path) -> dict[str, str]:
    """The environment the offline check gives ``python3``: ``PYTHONPATH`` the wheels'
    target folder, nothing of this process's own paths."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONPATH"] = str(target)
    env["PYTHONNOUSERSITE"] = "1"
    return env
