"""Parts of files read straight into memory, or copied from file to file inside the kernel: what
``cp`` does, for parts of files.

Where a tensor of the output is bytes already on disk in the input (an export of a checkpoint that
stores its rows plainly: formats/torch_dist.py ``CheckpointReader.byte_ranges``), copying those
bytes with ``copy_file_range(2)`` moves them from page cache to page cache with no copy through
this process: no buffer to allocate, fault in and zero, no read and write of every byte (measured,
docs/benchmarks.md: 3 GB in 16 MB pieces 2.3-2.7 s, ``cp`` 2.65 s, pread/write through one reused
64 MB buffer 3.2-3.6 s). Filesystems or kernels without it (across filesystems before Linux 5.19,
some network filesystems) get the same bytes through a buffer.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import NamedTuple

# Errors with which copy_file_range says "not here", not "failed": the buffered copy takes over.
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM, errno.ETXTBSY}
_BUFFER_BYTES = 8 * 2**20


class FileRange(NamedTuple):
    """Bytes [offset, offset + length) of the file ``path``."""

    path: Path
    offset: int
    length: int


def read_ranges(ranges: list[FileRange], buffer: memoryview) -> int:
    """Read ``ranges``, in order, into ``buffer`` straight from the files (``preadv``: no buffer of
    Python's, no second copy); returns the bytes read, fewer than the ranges hold where a file ends
    early (the caller names the error)."""
    at = 0
    for path, offset, length in ranges:
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < length:  # one read(2) returns at most about 2 GiB
                n = os.preadv(fd, [buffer[at + done : at + length]], offset + done)
                if n == 0:
                    return at + done
                done += n
        finally:
            os.close(fd)
        at += length
    return at


def copy_ranges(ranges: list[FileRange], dst_fd: int) -> int:
    """Append ``ranges``, in order, at ``dst_fd``'s position (which advances); returns the bytes
    copied. A source shorter than its range raises an error naming the file."""
    total = 0
    kernel = hasattr(os, "copy_file_range")
    buffer = None  # the buffered copy's, made when first needed
    for path, offset, length in ranges:
        src = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < length:
                if kernel:
                    try:
                        n = os.copy_file_range(src, dst_fd, length - done, offset + done)
                    except OSError as e:
                        if e.errno not in _UNSUPPORTED:
                            raise
                        n = 0
                    if n:
                        done += n
                        continue
                    # Refused, or 0 bytes: the end of the file, or a filesystem (FUSE, /proc) that
                    # answers 0 where it cannot copy. The buffered copy tells the two apart.
                    kernel = False
                buffer = buffer or memoryview(bytearray(_BUFFER_BYTES))
                n = _buffered_copy(src, dst_fd, offset + done, length - done, buffer)
                if n == 0:
                    raise ValueError(
                        f"{path}: ends before byte {offset + length} (read up to {offset + done}); "
                        "the file is truncated: copy it again"
                    )
                done += n
        finally:
            os.close(src)
        total += length
    return total


def _buffered_copy(src: int, dst: int, offset: int, length: int, buffer: memoryview) -> int:
    """Up to ``length`` bytes from ``offset`` of ``src`` appended at ``dst``; 0 at the end of ``src``."""
    n = os.preadv(src, [buffer[:length]], offset)
    written = 0
    while written < n:
        written += os.write(dst, buffer[written:n])
    return n
