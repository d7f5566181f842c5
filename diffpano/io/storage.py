"""One storage layer for local paths, file:// and s3:// URIs (pyarrow.fs), configured by the standard AWS variables."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

S3_RETRY_ATTEMPTS = 10


FORWARDED_ENV = ("AWS_", "DIFFPANO_", "HF_")


def worker_env() -> dict[str, str]:
    """Environment variables worker processes need (storage credentials and endpoints), taken from this process."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


def is_remote(uri: str) -> bool:
    """True for s3:// URIs."""
    return str(uri).startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem from AWS_* variables (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for S3-compatible stores)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = dict(
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS),
        connect_timeout=10,
        request_timeout=60,
    )
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # Explicit keys travel with the pickled filesystem to Ray processes started before they were set.
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "http" if endpoint.startswith("http://") else "https"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// URI or s3://bucket/key."""
    uri = str(uri)
    if is_remote(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def absolute(uri: str | os.PathLike) -> str:
    """s3:// URIs as they are; local paths and file:// URIs as absolute paths (Ray workers run in other folders)."""
    uri = str(uri)
    return uri.rstrip("/") if is_remote(uri) else resolve(uri)[1]


def join(uri: str, *parts: str) -> str:
    """URI of a path below `uri`."""
    base = str(uri).rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    """True when a file or directory exists at uri."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The whole content of a file."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes, staging: str | None = None) -> None:
    """Write a file so that readers see it whole or not at all (local: temp file + rename; S3: one PUT).

    A local temp file goes to `staging` (a folder on the same disk) when given, so that readers globbing the
    target's folder (DuckDB reads hidden files too) never see it.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(resolve(staging)[1]) if staging else target.parent
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{uuid.uuid4().hex}-{target.name}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files below uri (recursive) whose names end with suffix; [] when uri does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    root = str(uri).rstrip("/")
    return sorted(
        join(root, info.path[len(path) :])
        for info in infos
        if info.type == pafs.FileType.File and info.base_name.endswith(suffix)
    )


def tree_fingerprint(uri: str) -> str:
    """Relative path, size and modification time of every file below uri, one per line: changes when any file does."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    lines = sorted(
        f"{info.path[len(path):]} {info.size} {info.mtime_ns}" for info in infos if info.type == pafs.FileType.File
    )
    return "\n".join(lines)


def copy_tree(src: str, dst: str) -> None:
    """Copy a directory tree between any two supported locations."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    if isinstance(dst_fs, pafs.LocalFileSystem):
        Path(dst_path).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs, use_threads=True)


def exchange_dirs(a: str, b: str) -> None:
    """Swap two local directories in one atomic step (Linux renameat2 RENAME_EXCHANGE): no moment shows neither."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        raise OSError(errno.ENOSYS, "renameat2 (RENAME_EXCHANGE) is not available: Linux >= 3.15 with glibc >= 2.28")
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"exchange {a} <-> {b}: {os.strerror(err)}")


@contextmanager
def local_lock(path: str, exclusive: bool) -> Iterator[None]:
    """An advisory lock on a local file (flock): shared for writers that may overlap, exclusive for one owner."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
