"""Just enough of the ELF format to find a binary's interpreter, and content hashing with bounds."""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass

PT_INTERP = 3
LOADER_NAME = re.compile(r"^ld(-linux[^/]*|-musl[^/]*|64)?\.so(\.\d+)*$|^ld-linux[^/]*\.so(\.\d+)*$")
CHUNK = 1 << 20


class TooLargeError(Exception):
    pass


@dataclass(frozen=True)
class FileFacts:
    sha256: str
    interp: str | None  # PT_INTERP of an ELF binary
    shebang: bool


def is_loader_name(path: str) -> bool:
    return bool(LOADER_NAME.match(os.path.basename(path)))


def interp_of(head: bytes, fd: int) -> str | None:
    """The PT_INTERP path of an ELF file (64- or 32-bit, little endian), or None."""
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[5] != 1:
        return None
    if head[4] == 2:
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        fmt, off_at, size_at = "<IIQQQQQQ", 8, 32
    elif head[4] == 1:
        phoff, = struct.unpack_from("<I", head, 28)
        phentsize, phnum = struct.unpack_from("<HH", head, 42)
        fmt, off_at, size_at = "<IIIIIIII", 4, 16
    else:
        return None
    if phnum == 0 or phnum > 512 or phentsize < struct.calcsize(fmt):
        return None
    table = os.pread(fd, phentsize * phnum, phoff)
    for i in range(len(table) // phentsize):
        ent = table[i * phentsize:(i + 1) * phentsize]
        if struct.unpack_from("<I", ent, 0)[0] != PT_INTERP:
            continue
        if head[4] == 2:
            p_offset, = struct.unpack_from("<Q", ent, off_at)
            p_filesz, = struct.unpack_from("<Q", ent, size_at)
        else:
            p_offset, = struct.unpack_from("<I", ent, off_at)
            p_filesz, = struct.unpack_from("<I", ent, size_at)
        if not 1 < p_filesz <= 4096:
            return None
        return os.pread(fd, p_filesz, p_offset).split(b"\0", 1)[0].decode(errors="replace")
    return None


def facts(fd: int, size: int, max_bytes: int) -> FileFacts:
    """Hash the whole content through ``fd`` (pread: the fd's offset is left alone)."""
    if size > max_bytes:
        raise TooLargeError(f"{size} bytes is over the {max_bytes}-byte hashing bound")
    h = hashlib.sha256()
    head = b""
    off = 0
    while True:
        buf = os.pread(fd, CHUNK, off)
        if not buf:
            break
        if off == 0:
            head = buf[:4096]
        h.update(buf)
        off += len(buf)
        if off > max_bytes:  # grew while we read
            raise TooLargeError(f"over the {max_bytes}-byte hashing bound")
    return FileFacts(sha256=h.hexdigest(), interp=interp_of(head, fd), shebang=head[:2] == b"#!")
