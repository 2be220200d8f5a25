"""Run folders on a local path (the default) or behind a URI (s3://, gs://, file://, ...) through pyarrow.fs.

A step always works in a local folder. When the runs folder is a URI, that folder is a cache
(~/.cache/textclf/runs/<scheme>/<path>): it is filled from the URI before a step and mirrored back after each
step, so evaluation and serving on any node read the exported model from the same place. Ray Train writes its
checkpoints straight to the URI (its storage_path), so they are never mirrored and never fetched.
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger("textclf.storage")
CHECKPOINTS = "ray_train"  # Ray Train's own folder inside a run
TMP_MARK = ".textclf-tmp-"  # in the name of a file being copied, until it is complete


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
    prefix = base.rstrip("/") + "/"
    infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True))
    files = {}
    for i in infos:
        if i.type != pyarrow.fs.FileType.File:
            continue
        if not i.path.startswith(prefix):
            raise ValueError(f"{i.path!r}: listed under {base!r} but not inside it")
        files[i.path[len(prefix) :]] = i
    return files


def _check_key(rel: str, dst_fs, dst: str) -> None:
    """A key may only name a file inside dst: a plain relative path, and on a local side one that does not leave dst
    through a symbolic link either (a run behind a URI is data from elsewhere)."""
    import pyarrow.fs

    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"refusing to copy {rel!r}: not a plain relative path inside {dst}")
    if isinstance(dst_fs, pyarrow.fs.LocalFileSystem):
        root = os.path.realpath(dst)
        if not os.path.realpath(os.path.join(root, *parts)).startswith(root + os.sep):
            raise ValueError(f"refusing to copy {rel!r}: it resolves outside {dst}")


def _copy(src_fs, src: str, dst_fs, dst: str, skip: Iterable[str]) -> int:
    """Copy changed files (by size and modification time) from src to dst; returns how many were copied. Every key is
    checked before anything is copied. On a local side each file is written under a temporary name and renamed, so a
    reader never sees half a file, and a failed copy takes its temporary file and the empty folders it made with it."""
    import pyarrow.fs

    skip = set(skip)
    have = _files(dst_fs, dst)
    todo = {rel: info for rel, info in sorted(_files(src_fs, src).items()) if not set(rel.split("/")) & skip}
    for rel in todo:
        _check_key(rel, dst_fs, dst)
    local_dst = isinstance(dst_fs, pyarrow.fs.LocalFileSystem)
    made: list[str] = []  # local folders this call created
    n = 0
    try:
        for rel, info in todo.items():
            old = have.get(rel)
            if (
                old is not None
                and old.size == info.size
                and old.mtime_ns is not None
                and info.mtime_ns is not None
                and old.mtime_ns >= info.mtime_ns
            ):
                continue
            source, target = f"{src.rstrip('/')}/{rel}", f"{dst.rstrip('/')}/{rel}"
            folder, name = target.rsplit("/", 1)
            if local_dst:
                made += _missing_top(folder)
            dst_fs.create_dir(folder, recursive=True)
            if local_dst:
                _copy_local(src_fs, source, dst_fs, folder, name, info.mtime_ns)
            else:
                pyarrow.fs.copy_files(source, target, source_filesystem=src_fs, destination_filesystem=dst_fs)
                if isinstance(src_fs, pyarrow.fs.LocalFileSystem):  # the local side takes the other side's time
                    m = dst_fs.get_file_info(target).mtime_ns
                    os.utime(source, ns=(m, m))
            n += 1
    except BaseException:
        for top in reversed(made):
            for folder, _, _ in os.walk(top, topdown=False):
                if not os.listdir(folder):
                    os.rmdir(folder)
        raise
    return n


def _missing_top(folder: str) -> list[str]:
    """The outermost missing folder on the way to folder ([] when it exists)."""
    top = None
    while not os.path.isdir(folder):
        top, folder = folder, os.path.dirname(folder)
    return [top] if top else []


def _copy_local(src_fs, source: str, dst_fs, folder: str, name: str, mtime_ns: Optional[int]) -> None:
    """One file into a local folder: copied under a temporary name, given the source's time (so the next sync in
    either direction skips it), then renamed into place."""
    import pyarrow.fs

    tmp = f"{folder}/.{name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        pyarrow.fs.copy_files(source, tmp, source_filesystem=src_fs, destination_filesystem=dst_fs)
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, f"{folder}/{name}")
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def upload(local_dir: Path, uri: str, skip: Iterable[str] = (CHECKPOINTS,)) -> int:
    """Mirror a local run folder to its URI (changed files only)."""
    import pyarrow.fs

    fs, path = _fs(uri)
    n = _copy(pyarrow.fs.LocalFileSystem(), str(Path(local_dir).resolve()), fs, path, skip)
    log.info("mirrored %d files of %s to %s", n, local_dir, uri)
    return n


def download(uri: str, local_dir: Optional[Path] = None, skip: Iterable[str] = (CHECKPOINTS,)) -> Path:
    """Fetch a URI folder into its local cache (or local_dir); changed files only. Returns the local folder.
    Downloads into the same folder take turns (a lock file beside it)."""
    import pyarrow.fs

    local = (Path(local_dir) if local_dir else cache_dir(uri)).resolve()
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(local.parent / f".{local.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in local.rglob(f"*{TMP_MARK}*") if local.is_dir() else ():
            stale.unlink()  # left by a download that was killed mid-file
        fs, path = _fs(uri)
        n = _copy(fs, path, pyarrow.fs.LocalFileSystem(), str(local), skip)
        local.mkdir(exist_ok=True)
    log.info("fetched %d files of %s into %s", n, uri, local)
    return local


def remove(location: str, names: Optional[Iterable[str]] = None) -> list[str]:
    """Delete a folder (a local path or a URI), or only the named files and folders inside it; returns the paths that
    were there."""
    import pyarrow.fs

    fs, base = _fs(location) if is_uri(location) else (pyarrow.fs.LocalFileSystem(), str(Path(location).resolve()))
    gone = []
    for target in [base] if names is None else [join(base, n) for n in names]:
        kind = fs.get_file_info(target).type
        if kind == pyarrow.fs.FileType.Directory:
            fs.delete_dir(target)
        elif kind == pyarrow.fs.FileType.File:
            fs.delete_file(target)
        else:
            continue
        gone.append(target)
    return gone
