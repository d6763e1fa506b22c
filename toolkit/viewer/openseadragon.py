"""OpenSeadragon, the viewer's pan/zoom library: pinned, fetched with npm, found on disk.

The npm package ``openseadragon@VERSION`` is fetched with ``npm pack`` (npm's own client,
from the registry npm is configured for), its tarball checked against the pinned
``INTEGRITY`` (the registry's sha512), and its minified build, button images and licence
unpacked into a folder that :func:`find` looks in, in this order:

1. ``$MCLX_OPENSEADRAGON``: a folder holding ``openseadragon.min.js`` (an offline copy,
   ``node_modules/openseadragon/build/openseadragon``);
2. ``vendor/openseadragon-VERSION`` beside this module: package data, filled by
   ``make install`` in a checkout (a wheel built afterwards carries it);
3. ``$XDG_CACHE_HOME/mclx/openseadragon-VERSION`` (``~/.cache``): where
   ``python -m mclx.viewer.openseadragon`` puts it when the package folder is read-only.

Nothing here is written by hand or committed: the folder is made by :func:`fetch`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "6.1.1"
INTEGRITY = (  # the registry's dist.integrity of openseadragon-VERSION.tgz
    "sha512-g4iKe2q8B642SaBT3+x4ZF3/8b1TxPPydyjmtrOLgDrlYWMKd9ZXM+1Cb/xa9DVySkvs/7l6HR1nHKfD5F3T"
    "sw=="
)
ENV = "MCLX_OPENSEADRAGON"
SCRIPT = "openseadragon.min.js"
FETCH = "python -m mclx.viewer.openseadragon"  # what the error message tells users to run
_BUILD = "package/build/openseadragon/"


def vendor_dir() -> Path:
    return Path(__file__).resolve().parent / "vendor" / f"openseadragon-{VERSION}"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mclx" / f"openseadragon-{VERSION}"


def find() -> Path:
    """The folder holding ``openseadragon.min.js`` (its ``images/`` beside it); raises
    ``FileNotFoundError`` with the command that fetches it."""
    env = os.environ.get(ENV)
    if env:
        if not (Path(env) / SCRIPT).is_file():
            msg = f"{env}: ${ENV} has no {SCRIPT} (an openseadragon build folder is expected)"
            raise FileNotFoundError(msg)
        return Path(env)
    for folder in (vendor_dir(), cache_dir()):
        if (folder / SCRIPT).is_file():
            return folder
    msg = (
        f"OpenSeadragon {VERSION} (the viewer's pan/zoom library) is not installed in "
        f"{vendor_dir()} or {cache_dir()}: run `{FETCH}` (fetches it with npm; `make install` "
        f"does it in a checkout) or set ${ENV} to an openseadragon build folder"
    )
    raise FileNotFoundError(msg)


def version_of(folder: Path) -> str:
    """The version the script's banner states ("//! openseadragon 6.1.1"), or "unknown"."""
    with open(folder / SCRIPT, encoding="utf-8", errors="replace") as fh:
        head = fh.readline().split()
    return head[2] if len(head) >= 3 and head[1] == "openseadragon" else "unknown"


def _npm_pack(dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        msg = (
            f"npm: not found; OpenSeadragon {VERSION} is fetched with npm (install Node.js), "
            f"or set ${ENV} to an openseadragon build folder"
        )
        raise FileNotFoundError(msg)
    cmd = [npm, "pack", f"openseadragon@{VERSION}", "--pack-destination", str(dest), "--silent"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    tgz = dest / f"openseadragon-{VERSION}.tgz"
    if res.returncode != 0 or not tgz.is_file():
        why = " ".join((res.stderr or res.stdout).split())[-300:] or f"exit {res.returncode}"
        msg = f"npm pack openseadragon@{VERSION} failed: {why}"
        raise RuntimeError(msg)
    return tgz


def check_integrity(tgz: Path, integrity: str = INTEGRITY) -> None:
    algo, _, want = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, tgz.read_bytes()).digest()).decode()
    if got != want:
        msg = f"{tgz}: {algo} {got} is not the pinned {want}: not the published package"
        raise RuntimeError(msg)


def _unpack(tgz: Path, into: Path) -> None:
    """The minified script, its images and the licence, flattened into ``into``."""
    with tarfile.open(tgz, "r:gz") as tar:
        for m in tar.getmembers():
            if m.name == "package/LICENSE.txt":
                rel = "LICENSE.txt"
            elif m.name == _BUILD + SCRIPT or m.name.startswith(_BUILD + "images/"):
                rel = m.name[len(_BUILD) :]
            else:
                continue
            if not m.isfile() or ".." in Path(rel).parts:
                continue
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(into / rel, "wb") as dst:
                shutil.copyfileobj(src, dst)


def fetch(dest: Path | None = None) -> Path:
    """Fetch the pinned package with npm into ``dest`` (default: the package's vendor
    folder when writable, else the user cache); a no-op when it is already there."""
    from mclx.files import atomic_folder

    if dest is None:
        dest = vendor_dir()
        if not os.access(dest.parent if dest.parent.exists() else dest.parent.parent, os.W_OK):
            dest = cache_dir()
    if (dest / SCRIPT).is_file() and version_of(dest) == VERSION:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tgz = _npm_pack(Path(tmp))
        check_integrity(tgz)
        with atomic_folder(dest) as staging:
            _unpack(tgz, staging)
            if version_of(staging) != VERSION:
                msg = f"{tgz}: its {SCRIPT} is not version {VERSION}"
                raise RuntimeError(msg)
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m mclx.viewer.openseadragon [DEST]``: fetch OpenSeadragon for ``mclx view``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        folder = fetch(Path(args[0]) if args else None)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"mclx: error: {exc}", file=sys.stderr)
        return 1
    print(f"mclx: OpenSeadragon {VERSION} in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
