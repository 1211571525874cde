"""File I/O shared by the library.

Atomic writes: a temporary file in the same folder, flushed, then renamed over the target, so
readers (and a resumed run) never see half a file and an interrupted write keeps the old one.

Text reads: every text file the library reads (configs, CSV lists, split files, class-name lists,
run files) is UTF-8 with an optional byte-order mark (:func:`read_text`); a file in another
encoding is an :class:`EncodingError` naming the file, the byte offset and the fix.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600: use the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_BOM = b"\xef\xbb\xbf"


class EncodingError(ValueError):
    """A text file is not UTF-8; the message names the file, the byte offset and the fix."""


def decode_text(data: bytes, where: str | os.PathLike) -> str:
    """``data`` decoded as UTF-8 (a leading byte-order mark dropped); newlines kept as they are.

    Raises:
        EncodingError: naming ``where``, the offset and line of the first bad byte.
    """
    skip = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = data.count(b"\n", 0, at) + 1
        raise EncodingError(
            f"{where}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}, line {line}); "
            "re-save the file as UTF-8"
        ) from None


def read_text(path: str | os.PathLike) -> str:
    """The text of ``path``: UTF-8 with an optional byte-order mark (see :func:`decode_text`)."""
    return decode_text(Path(path).read_bytes(), path)
