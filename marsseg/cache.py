"""The conversion cache of a fold folder: what each conversion wrote, checked before a load.

A backend conversion (`backends`) writes ``<fold>/cache/<key>.{xml,bin|pt2}`` and then,
last, ``<key>.json``: a manifest with the sha256 of every file it wrote, the weights'
sha256, the backend, precision, static batch and package versions (written atomically;
its presence means the conversion is whole). Before a cached conversion is loaded its
files are hashed and compared with the manifest, so a tampered, truncated or mixed-up
file (another fold's pair copied under this key) is converted again, and a compiled
native library is never loaded unverified. The prune removes only names this cache
writes (and temporary names of dead processes), never through a symbolic link.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ._io import pid_alive, sha256_file, write_json_atomic
from .runfolder import CACHE_NAME_RE

MANIFEST = ".json"
FORMAT_VERSION = 1


def versions(backend: str) -> dict:
    """The package versions a conversion depends on (a new version converts again)."""
    import torch

    out = {"torch": torch.__version__}
    for pkg in ("openvino", "nncf") if backend.startswith("openvino") else ():
        with contextlib.suppress(ImportError):
            out[pkg] = __import__(pkg).__version__
    return out


def manifest_path(key: Path) -> Path:
    return key.with_suffix(MANIFEST)


def usable_dir(cache_dir: Path) -> bool:
    """The cache folder may be written and read: not a symbolic link (nor inside one of
    the fold's), creatable, writable."""
    if cache_dir.is_symlink():
        return False
    try:
        cache_dir.mkdir(exist_ok=True)
    except OSError:
        return False
    return cache_dir.is_dir() and not cache_dir.is_symlink() and os.access(cache_dir, os.W_OK)


def write_manifest(key: Path, files: list[Path], *, backend: str, precision: str, batch: int,
                   weights_sha256: str) -> None:
    """Record the conversion at `key` (after its files are in place)."""
    write_json_atomic(manifest_path(key), {
        "format_version": FORMAT_VERSION, "backend": backend, "precision": precision,
        "batch": batch, "weights_sha256": weights_sha256, "versions": versions(backend),
        "files": {p.name: sha256_file(p) for p in files}})


def expected(key: Path, *, backend: str, precision: str, batch: int,
             weights_sha256: str) -> tuple[dict | None, str]:
    """The manifest's {file name: sha256} when it describes this conversion, else (None,
    why not). Cheap: reads the manifest and checks the files exist, hashes nothing."""
    path = manifest_path(key)
    if not path.is_file():
        return None, "no manifest" if any(key.parent.glob(f"{key.name}.*")) else "not cached"
    try:
        m = json.loads(path.read_text())
        files = m["files"]
        ok = (m.get("format_version") == FORMAT_VERSION and m.get("backend") == backend
              and m.get("precision") == precision and m.get("batch") == batch
              and m.get("weights_sha256") == weights_sha256 and m.get("versions") == versions(backend)
              and isinstance(files, dict) and files
              and all(isinstance(v, str) and CACHE_NAME_RE.fullmatch(k) and k.startswith(key.name)
                      for k, v in files.items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, f"unreadable {path.name}"
    if not ok:
        return None, f"{path.name} is for other weights, settings or versions"
    missing = [k for k in files if not (key.parent / k).is_file() or (key.parent / k).is_symlink()]
    if missing:
        return None, f"{missing[0]} is missing"
    return files, ""


def read_verified(path: Path, sha256: str) -> bytes | None:
    """The bytes of `path` when their sha256 is `sha256` (read once: what is hashed is
    what is used), else None."""
    import hashlib

    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


def remove(key: Path) -> None:
    """Remove every file of the conversion at `key` (a failed or untrusted one)."""
    for p in key.parent.glob(f"{key.name}.*"):
        m = CACHE_NAME_RE.fullmatch(p.name)
        if m and p.name.startswith(key.name) and not p.is_dir():
            with contextlib.suppress(OSError):
                p.unlink()


def prune(cache_dir: Path, backend: str, sha: str) -> None:
    """Drop this backend's conversions of other weights (the fold was retrained) and the
    temporary files of dead processes: only names `CACHE_NAME_RE` matches in full, only in a real
    folder (a symbolic link is never followed)."""
    if not cache_dir.is_dir() or cache_dir.is_symlink():
        return
    for p in cache_dir.iterdir():
        m = CACHE_NAME_RE.fullmatch(p.name)
        if not m or p.is_dir():
            continue
        stale = m["backend"] == backend and m["sha"] != sha[:16] and m["pid"] is None
        dead = m["pid"] is not None and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"]))
        if stale or dead:
            with contextlib.suppress(OSError):
                p.unlink()

