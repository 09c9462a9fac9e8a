"""fsspec URLs: every path in raycp is a URL (local path, ``file://``, ``s3://``, ``gs://``).

Credentials never appear in configs or logs: they come from the environment (AWS_* variables,
instance roles, ``~/.aws``) or from ``RAYCP_S3_ENDPOINT_URL`` for S3-compatible stores.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from collections.abc import Callable
from typing import Any

import fsspec

from raycp.errors import InputError, StorageError

#: Transient object-store errors worth retrying (network blips, throttling).
_RETRIES = 3


def storage_options(url: str) -> dict[str, Any]:
    """Filesystem options for ``url`` taken from the environment (never from config files)."""
    protocol = protocol_of(url)
    if protocol == "s3":
        opts: dict[str, Any] = {}
        endpoint = os.environ.get("RAYCP_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        if os.environ.get("RAYCP_S3_ANON") == "1":
            opts["anon"] = True
        return opts
    return {}


def protocol_of(url: str) -> str:
    """``'file'`` for local paths, else the URL scheme (``s3``, ``gs``, ``memory`` ...)."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the protocol-less path for ``url``."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL parts with ``/`` (local paths too); ``parts`` are checked by :func:`safe_name`."""
    for part in parts:
        for piece in part.split("/"):
            if piece:
                safe_name(piece)
    if protocol_of(base) == "file" and "://" not in base:
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def safe_name(name: str, *, what: str = "name") -> str:
    """Reject names that would escape an output folder when used as a path component."""
    text = str(name)
    if (
        text in {"", ".", ".."}
        or "/" in text
        or "\\" in text
        or "\x00" in text
        or text.startswith("~")
    ):
        raise InputError(
            f"{what} {text!r} cannot be used in an output path",
            fix="use plate/well/site names without '/', '\\', '..' or a leading '~'",
        )
    return text


def resolve(url: str, base: str | None = None) -> str:
    """Resolve a relative path against ``base`` (a folder URL); absolute URLs pass through."""
    if "://" in url or os.path.isabs(url) or base is None:
        return url
    return join(base, url)


_DRIVE = re.compile(r"^[A-Za-z]:([\\/]|$)")


def is_windows_absolute(path: str) -> bool:
    """``C:\\images``, ``C:/images`` or a UNC share ``\\\\server\\share``: a path on a Windows
    machine that no Ray worker can open."""
    text = str(path).strip()
    return bool(_DRIVE.match(text)) or text.startswith("\\\\")


def input_path(path: str, base: str | None = None) -> str:
    """A file location read from a user's table (LoadData ``PathName_*``, a DeepProfiler index)
    as a URL: ``file:`` URLs become local paths, Windows separators (``images\\plate1``) become
    ``/``, and a relative path (``../images/plate1``) is resolved against ``base`` (the table's
    folder) with ``.`` and ``..`` collapsed. Object-store URLs pass through with their key
    normalised. Unlike :func:`join`, the parts are not checked as output names: reading from
    ``../images`` is fine, writing there is not. Windows drive paths are the caller's error to
    report (:func:`is_windows_absolute`)."""
    text = str(path).strip()
    if text.lower().startswith("file://"):
        from urllib.parse import unquote, urlparse

        text = unquote(urlparse(text).path)
    if "://" not in text:
        text = text.replace("\\", "/")
        if base is None or text.startswith("/"):
            return os.path.normpath(text) if text else text
        if "://" not in base:
            return os.path.normpath(os.path.join(base, text))
        text = f"{base.rstrip('/')}/{text}"
    scheme, rest = text.split("://", 1)
    bucket, _, key = rest.partition("/")
    key = posixpath.normpath("/" + key).lstrip("/") if key else ""  # '..' stops at the bucket
    return f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}"


def input_url(path: str, base: str | None = None) -> str:
    """:func:`input_path`, with a local result made absolute (Ray workers need not share the
    driver's working directory)."""
    url = input_path(path, base)
    return url if "://" in url else os.path.abspath(url)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def with_retries(fn: Callable[[], Any], *, url: str, retries: int = _RETRIES) -> Any:
    """Call ``fn``, retrying transient object-store errors (not missing files)."""
    last: Exception | None = None
    for _ in range(retries):
        try:
            return fn()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except (ConnectionError, TimeoutError, OSError) as exc:  # OSError covers botocore IO
            last = exc
    raise StorageError(f"{url}: {type(last).__name__}: {last}", fix="check the object store")


def read_bytes(url: str) -> bytes:
    """All bytes of ``url``; transient errors are retried, a missing file raises FileNotFoundError."""
    fs, path = filesystem(url)
    return with_retries(lambda: fs.cat_file(path), url=url)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write then rename: readers never see a partial file, re-runs overwrite cleanly.

    On object stores a PUT is already atomic, so the object is written in one request.
    """
    fs, path = filesystem(url)
    parent = posixpath.dirname(path) if protocol_of(url) != "file" else os.path.dirname(path)
    try:
        if protocol_of(url) == "file":
            os.makedirs(parent or ".", exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:
            with_retries(lambda: fs.pipe_file(path, data), url=url)
    except _NOT_WRITABLE as exc:
        raise not_writable(url, exc) from None


_NOT_WRITABLE = (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError)


def not_writable(url: str, exc: OSError) -> InputError:
    """The one-line error for an output location a user chose that cannot be written (a folder
    below a regular file, no permission): exit code 2, unlike an unreachable store (4)."""
    reason = {NotADirectoryError: "a part of the path is a file, not a folder",
              FileExistsError: "a part of the path is a file, not a folder",
              IsADirectoryError: "it is a folder"}.get(type(exc), exc.strerror or str(exc))
    return InputError(f"{url}: output location is not writable ({reason})",
                      fix="choose an output folder you can write to")


def make_local_folder(path) -> None:
    """``mkdir -p`` for a local output folder, with :func:`not_writable` as its error."""
    try:
        os.makedirs(path, exist_ok=True)
    except _NOT_WRITABLE as exc:
        raise not_writable(str(path), exc) from None


def upload_file(local: str, url: str) -> None:
    """Store a finished local file at ``url`` atomically (copy + rename locally, one PUT on object
    stores), for outputs too large to build in memory."""
    import shutil

    fs, path = filesystem(url)
    if protocol_of(url) == "file":
        make_local_folder(os.path.dirname(path) or ".")
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)
    else:
        with_retries(lambda: fs.put_file(local, path), url=url)


def atomic_write_text(url: str, text: str) -> None:
    atomic_write_bytes(url, text.encode("utf-8"))


def ensure_writable(url: str) -> None:
    """Fail early, with one line, when ``url`` (a folder) cannot be written."""
    probe = join(url, f".raycp-write-test-{uuid.uuid4().hex}")
    try:
        atomic_write_bytes(probe, b"ok")
        fs, path = filesystem(probe)
        fs.rm_file(path)
    except InputError as exc:  # name the folder the user chose, not the probe file
        raise InputError(exc.message.replace(probe, url), fix=exc.fix) from None
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means "not writable"
        raise StorageError(f"{url}: output location is not writable ({type(exc).__name__}: {exc})",
                           fix="choose an output URL you can write to") from None
