"""Finding dataset files: checksums, torchvision's download where the network allows, one clear error when
files are missing."""

from __future__ import annotations

import contextlib
import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

from cil.errors import DataError

_DOWNLOAD_TIMEOUT_S = 30.0  # offline machines may silently drop packets; do not hang forever


def where_hint() -> str:
    return "copy the files there, or point CIL_DATA_ROOT (or dataset.root) at a folder that has them"


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_md5(path: Path, expected: str) -> None:
    actual = md5(path)
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {path}: md5 {actual}, expected {expected}. The file is corrupt "
            f"or a different version; replace it, or set dataset.verify=false to load it anyway"
        )


@contextlib.contextmanager
def _network_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def torchvision_download(tv_cls: type, root: Path) -> Exception | None:
    """Let torchvision fetch and unpack a whole dataset into ``root``; returns the error instead of raising it.
    Only for a dataset none of whose files are there: torchvision unpacks whatever archives it finds."""
    try:
        with _network_timeout(_DOWNLOAD_TIMEOUT_S):
            tv_cls(str(root), download=True)
    except Exception as e:  # noqa: BLE001 - any network/IO failure becomes one clear DataError below
        return e
    return None


def download_files(mirrors: list[str], names: list[str], md5s: dict[str, str], folder: Path) -> Exception | None:
    """Fetch just these files (no unpacking) from the first mirror that has each; returns the error, if any."""
    from torchvision.datasets.utils import download_url

    try:
        with _network_timeout(_DOWNLOAD_TIMEOUT_S):
            for name in names:
                for i, mirror in enumerate(mirrors):
                    try:
                        download_url(f"{mirror}{name}", str(folder), filename=name, md5=md5s[name])
                        break
                    except Exception:
                        if i == len(mirrors) - 1:
                            raise
    except Exception as e:  # noqa: BLE001
        return e
    return None


def missing_error(what: str, missing: list[str], directory: Path, tried: Exception | str | None) -> DataError:
    """`tried`: the download's error, a reason it was not tried, or None (download=False)."""
    why = (
        f" ({tried})"
        if isinstance(tried, str)
        else f" (download failed: {type(tried).__name__}: {tried})"
        if tried
        else " (download=False)"
    )
    return DataError(f"{what}: missing {', '.join(missing)} in {directory}{why}; {where_hint()}")
