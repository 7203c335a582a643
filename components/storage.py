"""Storage locations that are a local path or a URI (``s3://bucket/prefix``, ``gs://...``), one code path.

Ray Train checkpoints (``train.storage_path``, ``gan.storage_path``) and the artifacts a cluster
job hands back (``cluster.artifacts``) accept either. Local paths are made absolute, so Ray Train
workers on other nodes of a cluster with a shared volume open the same directory; URIs go to
pyarrow's filesystems unchanged. An S3-compatible store (MinIO, Ceph) is reached the way the AWS
tools reach it: ``AWS_ENDPOINT_URL`` and the usual credential variables, or pyarrow's query
options in the URI (``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``).
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations (s3, gs, hdfs, file, ...), False for plain paths."""
    return "://" in str(location)


def resolve(location: str | os.PathLike) -> str:
    """A URI unchanged, or a local path made absolute (``~`` expanded)."""
    if is_uri(location):
        return str(location)
    return str(Path(location).expanduser().resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location / part / ...`` for a path or a URI (a URI's query string stays at the end)."""
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    u = urlsplit(str(location))
    path = str(PurePosixPath(u.path or "/").joinpath(*parts))
    return urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))


def filesystem(location: str | os.PathLike):
    """``(pyarrow filesystem, path on it)`` for a path or a URI."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), resolve(location)
    fs, path = pafs.FileSystem.from_uri(str(location))
    if isinstance(fs, pafs.S3FileSystem):
        # Look before writing a directory marker: S3-compatible stores differ in how they answer a
        # marker that already exists (some refuse the conditional write), and it saves requests.
        # from_uri has no query option for it; the filesystem's own pickling state has every option.
        reconstruct, (options,) = fs.__reduce__()
        fs = reconstruct({**options, "check_directory_existence_before_creation": True})
    return fs, path


def ray_storage(location: str | os.PathLike) -> dict:
    """``storage_path`` (and ``storage_filesystem`` for a URI) for a Ray Train ``RunConfig``."""
    if not is_uri(location):
        return {"storage_path": resolve(location)}
    fs, path = filesystem(location)
    return {"storage_path": path, "storage_filesystem": fs}


def exists(location: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a file or a directory tree between any two locations (local <-> URI, URI <-> URI).

    A directory replaces what was at ``dst`` (stale files from an older copy never linger)."""
    import pyarrow.fs as pafs

    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
    info = src_fs.get_file_info(src_path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing to copy at {src}")
    delete(dst)
    if info.type == pafs.FileType.File:
        _copy_file(src_fs, src_path, dst_fs, dst_path)
        return
    _make_parent(dst_fs, str(PurePosixPath(dst_path) / "x"))
    for item in src_fs.get_file_info(pafs.FileSelector(src_path, recursive=True)):
        if item.type == pafs.FileType.File:
            rel = PurePosixPath(item.path).relative_to(PurePosixPath(src_path))
            _copy_file(src_fs, item.path, dst_fs, str(PurePosixPath(dst_path) / rel))


def _make_parent(fs, path: str) -> None:
    # Object stores have no directories to make (and some refuse the marker objects pyarrow would
    # write); a local filesystem needs them.
    if fs.type_name == "local":
        fs.create_dir(str(PurePosixPath(path).parent), recursive=True)


def _copy_file(src_fs, src_path: str, dst_fs, dst_path: str, chunk: int = 8 << 20) -> None:
    _make_parent(dst_fs, dst_path)
    with src_fs.open_input_stream(src_path) as r, dst_fs.open_output_stream(dst_path) as w:
        while True:
            block = r.read(chunk)
            if not block:
                break
            w.write(block)


def delete(location: str | os.PathLike) -> None:
    """Remove a file or a directory tree; nothing there is fine."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def read_text(location: str | os.PathLike) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str | os.PathLike, text: str) -> None:
    fs, path = filesystem(location)
    _make_parent(fs, path)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
