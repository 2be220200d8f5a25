"""Run folders on a local path (the default) or behind a URI (s3://, gs://, file://, ...) through pyarrow.fs.

A step always works in a local folder. When the runs folder is a URI, that folder is a cache
(~/.cache/textclf/runs/<scheme>/<path>): it is filled from the URI before a step and mirrored back after each
step, so evaluation and serving on any node read the exported model from the same place. Ray Train writes its
checkpoints straight to the URI (its storage_path), so they are never mirrored and never fetched.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger("textclf.storage")
CHECKPOINTS = "ray_train"  # Ray Train's own folder inside a run


def is_uri(path: object) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def cache_dir(uri: str, cache_root: Optional[str] = None) -> Path:
    """The local copy of a URI: <cache>/runs/<scheme>/<bucket>/<path>."""
    from .models import cache_root as root

    scheme, rest = uri.split("://", 1)
    return root(cache_root) / "runs" / scheme / rest.strip("/")


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def _files(fs, base: str) -> dict[str, "object"]:
    """relative path -> FileInfo of every file under base (empty when base does not exist)."""
    import pyarrow.fs

    if fs.get_file_info(base).type == pyarrow.fs.FileType.NotFound:
        return {}
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True))
    return {i.path[len(base.rstrip("/")) + 1:]: i for i in infos if i.type == pyarrow.fs.FileType.File}


def _copy(src_fs, src: str, dst_fs, dst: str, skip: Iterable[str]) -> int:
    """Copy changed files (by size and modification time) from src to dst; returns how many were copied."""
    import pyarrow.fs

    skip = set(skip)
    have = _files(dst_fs, dst)
    n = 0
    for rel, info in sorted(_files(src_fs, src).items()):
        if set(rel.split("/")) & skip:
            continue
        old = have.get(rel)
        if old is not None and old.size == info.size and old.mtime_ns is not None and info.mtime_ns is not None \
                and old.mtime_ns >= info.mtime_ns:
            continue
        source, target = f"{src.rstrip('/')}/{rel}", f"{dst.rstrip('/')}/{rel}"
        dst_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pyarrow.fs.copy_files(source, target, source_filesystem=src_fs, destination_filesystem=dst_fs)
        # Give the local side the other side's time, so the next sync in either direction skips this file.
        if isinstance(dst_fs, pyarrow.fs.LocalFileSystem):
            os.utime(target, ns=(info.mtime_ns, info.mtime_ns))
        elif isinstance(src_fs, pyarrow.fs.LocalFileSystem):
            m = dst_fs.get_file_info(target).mtime_ns
            os.utime(source, ns=(m, m))
        n += 1
    return n


def upload(local_dir: Path, uri: str, skip: Iterable[str] = (CHECKPOINTS,)) -> int:
    """Mirror a local run folder to its URI (changed files only)."""
    import pyarrow.fs

    fs, path = _fs(uri)
    n = _copy(pyarrow.fs.LocalFileSystem(), str(Path(local_dir).resolve()), fs, path, skip)
    log.info("mirrored %d files of %s to %s", n, local_dir, uri)
    return n


def download(uri: str, local_dir: Optional[Path] = None, skip: Iterable[str] = (CHECKPOINTS,)) -> Path:
    """Fetch a URI folder into its local cache (or local_dir); changed files only. Returns the local folder."""
    import pyarrow.fs

    local = Path(local_dir) if local_dir else cache_dir(uri)
    local.mkdir(parents=True, exist_ok=True)
    fs, path = _fs(uri)
    n = _copy(fs, path, pyarrow.fs.LocalFileSystem(), str(local.resolve()), skip)
    log.info("fetched %d files of %s into %s", n, uri, local)
    return local
