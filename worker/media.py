"""Which files a queued job may read: only those under the configured media roots.

Paths are resolved to real paths first, so `..` and symbolic links cannot lead out of a root.
"""

from __future__ import annotations

import os
from pathlib import Path

from model.errors import FervidError


def media_roots() -> list[Path]:
    raw = os.environ.get("FERVID_MEDIA_ROOTS", "")
    roots = [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]
    if not roots:
        raise FervidError(
            "FERVID_MEDIA_ROOTS is not set: set it to the folders (separated by ':') that jobs may read videos from"
        )
    return roots


def check_media_path(path: str | Path, roots: list[Path] | None = None) -> Path:
    """The real path of `path` if it lies under a media root; FervidError otherwise."""
    roots = roots if roots is not None else media_roots()
    real = Path(path).expanduser().resolve()
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise FervidError(f"{path}: outside the media roots (FERVID_MEDIA_ROOTS); refusing to read it")
    return real
