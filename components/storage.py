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
    return pafs.FileSystem.from_uri(str(location))


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
    if info.type == pafs.FileType.Directory:
        dst_fs.create_dir(dst_path, recursive=True)
    else:
        parent = str(PurePosixPath(dst_path).parent)
        if parent:
            dst_fs.create_dir(parent, recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


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
    parent = str(PurePosixPath(path).parent)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())
