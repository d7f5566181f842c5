"""One storage layer for local paths, file:// and s3:// URIs (pyarrow.fs), configured by the standard AWS variables."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import ParamSpec, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from diffpano.defaults import STORAGE_WAIT_S

READ_THREADS = 16  # files read_folder reads at once
S3_DELETE_BATCH = 1000  # keys in one DeleteObjects request (S3's limit)
S3_RETRY_ATTEMPTS = 3  # pyarrow's own quick retries of one request; outages are waited out by `waits_out_outages`
WAIT_ENV = "DIFFPANO_STORAGE_WAIT_S"  # forwarded to Ray workers (worker_env), so replicas wait as long as their job
# pyarrow's S3 errors are plain OSErrors; these AWS error names and curl failures mean "try again later".
TRANSIENT = re.compile(r"NETWORK_CONNECTION|curlCode|SERVICE_UNAVAILABLE|SLOW_DOWN|INTERNAL_FAILURE|REQUEST_TIMEOUT"
                       r"|THROTTLING|HTTP response code: 5\d\d"
                       r"|Could not connect to the endpoint URL|ServiceUnavailable|SlowDown|InternalError")  # boto3's
P = ParamSpec("P")
R = TypeVar("R")


FORWARDED_ENV = ("AWS_", "DIFFPANO_", "HF_")


def worker_env() -> dict[str, str]:
    """Environment variables worker processes need (storage credentials and endpoints), taken from this process."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}


class StorageUnavailable(OSError):
    """Object storage did not answer for the configured wait: the work stops where it is, to be resumed."""


_wait_override: ContextVar[float | None] = ContextVar("storage_wait_override", default=None)


@contextmanager
def wait_at_most(seconds: float) -> Iterator[None]:
    """Wait out outages at most this long inside the block (and the threads asyncio.to_thread starts from it): an
    HTTP request answers 503 rather than waiting as long as a job would."""
    token = _wait_override.set(seconds)
    try:
        yield
    finally:
        _wait_override.reset(token)


def storage_wait_s() -> float:
    """How long an s3:// operation retries through an outage (wait_at_most's bound, else DIFFPANO_STORAGE_WAIT_S,
    default STORAGE_WAIT_S)."""
    override = _wait_override.get()
    if override is not None:
        return override
    text = os.environ.get(WAIT_ENV)
    if not text:
        return STORAGE_WAIT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{WAIT_ENV}: expected a finite number of seconds >= 0, got {text!r}")
    return value


def set_storage_wait(seconds: float) -> None:
    """Make this process (and the Ray workers it starts, through worker_env) wait out outages this long."""
    os.environ[WAIT_ENV] = repr(float(seconds))


def is_transient(err: BaseException) -> bool:
    """Whether a storage error is an outage (connection, throttling, 5xx) rather than a missing or refused object."""
    return isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, PermissionError, StorageUnavailable)) \
        and bool(TRANSIENT.search(str(err)))


_waiting = threading.local()  # set while an outer call retries: inner calls fail fast instead of multiplying waits
OutageListener = Callable[[float, BaseException], None]
_listeners: list[OutageListener] = []


def on_outage(listener: OutageListener) -> Callable[[], None]:
    """Call listener(seconds waited, error) before each retry of an outage in this process; returns its remover."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def _names_remote(arg: object) -> bool:
    """Whether an argument is an s3:// URI or a list of URIs holding one."""
    if isinstance(arg, str):
        return is_remote(arg)
    return isinstance(arg, (list, tuple)) and any(isinstance(u, str) and is_remote(u) for u in arg)


def waits_out_outages(fn: Callable[P, R]) -> Callable[P, R]:
    """Retry fn through outages of the storage of its s3:// URIs (the first two arguments, or lists of them), up to
    storage_wait_s() with backoff; StorageUnavailable past it. Local paths are not retried (a local error is not an
    outage)."""

    @functools.wraps(fn)
    def retrying(*args: P.args, **kwargs: P.kwargs) -> R:
        remote = any(_names_remote(a) for a in args[:2])
        if not remote or getattr(_waiting, "active", False):
            return fn(*args, **kwargs)
        limit, started, pause = storage_wait_s(), time.monotonic(), 0.5
        _waiting.active = True
        try:
            while True:
                try:
                    return fn(*args, **kwargs)
                except OSError as err:
                    waited = time.monotonic() - started
                    if not is_transient(err):
                        raise
                    if waited + pause > limit:
                        raise StorageUnavailable(f"storage unavailable for {waited:.0f}s (the limit, {WAIT_ENV} or "
                                                 f"--storage-wait, is {limit:g}s): {str(err).splitlines()[0][:300]}"
                                                 ) from err
                    for listener in list(_listeners):
                        listener(waited, err)
                    time.sleep(pause)
                    pause = min(2 * pause, 10.0)
        finally:
            _waiting.active = False

    return retrying


def reachable(uri: str) -> bool:
    """One quick look at uri: False only when its storage has an outage now (never retried, never raises one)."""
    fs, path = resolve(uri)
    try:
        fs.get_file_info(path)
    except OSError as err:
        return not is_transient(err)
    return True


def is_remote(uri: str) -> bool:
    """True for s3:// URIs."""
    return str(uri).startswith("s3://")


def s3_region() -> str:
    """The AWS region of S3 requests: AWS_REGION (which boto3 ignores), AWS_DEFAULT_REGION, else us-east-1."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem from AWS_* variables (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for S3-compatible stores)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = dict(
        region=s3_region(),
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS),
        connect_timeout=10,
        request_timeout=60,
        allow_delayed_open=True,  # a small file is then written with one PUT, not a 3-request multipart upload
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


@waits_out_outages
def exists(uri: str) -> bool:
    """True when a file or directory exists at uri."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


@waits_out_outages
def read_bytes(uri: str) -> bytes:
    """The whole content of a file, as one version of it: on S3 one GET (pyarrow asks the size first, then the bytes:
    two requests, and an object rewritten in between would read torn)."""
    if is_remote(uri):
        bucket, key = _bucket_key(uri)
        with _boto_errors(uri):
            return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


@waits_out_outages
def read_range(uri: str, offset: int, size: int) -> bytes:
    """Up to size bytes of a file from offset (b"" past its end)."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return f.read_at(size, offset) if offset < f.size() else b""


@waits_out_outages
def parquet_row_groups(uri: str) -> int:
    """How many row groups a Parquet file has."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).num_row_groups


@waits_out_outages
def read_row_group(uri: str, index: int) -> pa.Table:
    """One row group of a Parquet file."""
    fs, path = resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read_row_group(index)


@waits_out_outages
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


def write_files(root: str, files: dict[str, bytes]) -> list[str]:
    """Write files (path relative to root -> bytes), each whole or not at all (write_bytes); their URIs."""
    uris = [join(root, rel) for rel in files]
    for uri, data in zip(uris, files.values(), strict=True):
        write_bytes(uri, data)
    return uris


@waits_out_outages
def create_once(uri: str, data: bytes) -> bool:
    """Create a file unless one is there, atomically: of writers racing for one uri exactly one gets True."""
    if is_remote(uri):
        return _s3_create_once(uri, data)
    path = Path(resolve(uri)[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _s3_create_once(uri: str, data: bytes) -> bool:
    """An S3 conditional PUT (If-None-Match: *)."""
    from botocore.exceptions import ClientError

    bucket, key = _bucket_key(uri)
    try:
        with _boto_errors(uri):
            _s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except OSError as err:
        if isinstance(err.__cause__, ClientError) and err.__cause__.response.get("Error", {}).get("Code") in (
                "PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


def _bucket_key(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _s3_client():
    """A boto3 S3 client configured by the same AWS variables (boto3 reads them itself), one per setting of them."""
    return _client_for(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))


@functools.lru_cache(maxsize=8)
def _client_for(aws_env: tuple[tuple[str, str], ...]):
    """The boto3 S3 client of these AWS variables (making one takes tens of milliseconds; they are thread-safe)."""
    import boto3

    return boto3.session.Session().client("s3", region_name=s3_region())


@contextmanager
def _boto_errors(uri: str) -> Iterator[None]:
    """boto3's failures as the OSErrors pyarrow raises: FileNotFoundError for a missing key, OSError otherwise."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise FileNotFoundError(f"{uri}: no such object") from err
        raise OSError(f"{uri}: {err}") from err
    except BotoCoreError as err:
        raise OSError(f"{uri}: {err}") from err


def _files(uri: str, suffix: str) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    """(filesystem, path, infos) of the files below uri (recursive) whose names end with suffix."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return fs, path, []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return fs, path, [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)]


@waits_out_outages
def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files below uri (recursive) whose names end with suffix; [] when uri does not exist."""
    _, path, infos = _files(uri, suffix)
    return sorted(join(uri, info.path[len(path):]) for info in infos)


@waits_out_outages
def delete_files(uris: list[str]) -> None:
    """Delete these files (those already gone are no error); on S3 in DeleteObjects requests of up to 1,000 keys."""
    local = [u for u in uris if not is_remote(u)]
    for uri in local:
        Path(resolve(uri)[1]).unlink(missing_ok=True)
    keys: dict[str, list[str]] = {}
    for uri in set(uris) - set(local):
        bucket, key = _bucket_key(uri)
        keys.setdefault(bucket, []).append(key)
    for bucket, names in keys.items():
        for start in range(0, len(names), S3_DELETE_BATCH):
            batch = [{"Key": k} for k in sorted(names)[start:start + S3_DELETE_BATCH]]
            with _boto_errors(f"s3://{bucket}"):
                answer = _s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise OSError(f"s3://{bucket}/{first.get('Key')}: {first.get('Code')} {first.get('Message')}")


@waits_out_outages
def read_folder(uri: str, suffix: str = "") -> dict[str, bytes]:
    """The bytes of every file below uri whose name ends with suffix, by URI: one GET each on S3, a few at once."""
    _, path, infos = _files(uri, suffix)
    uris = [join(uri, info.path[len(path):]) for info in infos]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return dict(zip(uris, pool.map(read_bytes, uris), strict=True))


@waits_out_outages
def tree_fingerprint(uri: str) -> str:
    """Relative path, size and modification time of every file below uri, one per line: changes when any file does."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    lines = sorted(
        f"{info.path[len(path):]} {info.size} {info.mtime_ns}" for info in infos if info.type == pafs.FileType.File
    )
    return "\n".join(lines)


@waits_out_outages
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
