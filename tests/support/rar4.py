"""A minimal writer of RAR 4.x archives with the "store" method (no compression).

No RAR creator can be installed here, yet the real UCF101 and HMDB51 archives are RAR 4, so the
download tests build their fixtures with this. Layout from the RAR 4 technical note
(https://www.rarlab.com/technote.htm): marker block, archive header, one file header + data per
member, end-of-archive block. Paths are stored with backslashes, as WinRAR does; unrar maps both
separators to '/' for RAR 1.5-4.x archives.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

MARKER = b"Rar!\x1a\x07\x00"
HEAD_MAIN = 0x73
HEAD_FILE = 0x74
HEAD_END = 0x7B
FLAG_LONG_BLOCK = 0x8000  # ADD_SIZE (here PACK_SIZE) follows the header: the packed data
FLAG_DIRECTORY = 0x00E0  # dictionary bits all set mean "directory" in a file header
HOST_WIN32 = 2
UNPACK_VERSION = 20  # 2.0: the lowest version that can extract stored files
METHOD_STORE = 0x30
ATTR_FILE = 0x20
ATTR_DIRECTORY = 0x10
DOS_TIME_2012_01_01 = ((2012 - 1980) << 25) | (1 << 21) | (1 << 16)


def _block(head_type: int, flags: int, body: bytes) -> bytes:
    """HEAD_CRC is the low 16 bits of the CRC32 of the header from HEAD_TYPE on."""
    head = struct.pack("<BHH", head_type, flags, 7 + len(body)) + body
    return struct.pack("<H", zlib.crc32(head) & 0xFFFF) + head


def _file_block(name: str, data: bytes, is_dir: bool) -> bytes:
    encoded = name.replace("/", "\\").encode("ascii")
    flags = FLAG_LONG_BLOCK | (FLAG_DIRECTORY if is_dir else 0)
    body = struct.pack(
        "<IIBIIBBHI",
        len(data),  # PACK_SIZE (stored: equal to UNP_SIZE)
        len(data),  # UNP_SIZE
        HOST_WIN32,
        zlib.crc32(data) & 0xFFFFFFFF,
        DOS_TIME_2012_01_01,
        UNPACK_VERSION,
        METHOD_STORE,
        len(encoded),
        ATTR_DIRECTORY if is_dir else ATTR_FILE,
    )
    return _block(HEAD_FILE, flags, body + encoded) + data


def rar4_bytes(members: dict[str, bytes], directories: tuple[str, ...] = ()) -> bytes:
    """A RAR 4 archive holding `members` (path -> content, '/' separated) in the given order.

    `directories` adds explicit directory entries, as WinRAR writes them before their files.
    """
    parts = [MARKER, _block(HEAD_MAIN, 0, b"\x00" * 6)]  # RESERVED1 (2 bytes) + RESERVED2 (4 bytes)
    parts += [_file_block(directory, b"", True) for directory in directories]
    for name, data in members.items():
        if any(ord(char) > 127 for char in name):
            raise ValueError(f"rar4 writer stores ASCII names only: {name!r}")
        parts.append(_file_block(name, data, False))
    parts.append(_block(HEAD_END, 0x4000, b""))  # 0x4000: "old format" end flag that unrar writes
    return b"".join(parts)


def write_rar4(path: str | Path, members: dict[str, bytes], directories: tuple[str, ...] = ()) -> Path:
    path = Path(path)
    path.write_bytes(rar4_bytes(members, directories))
    return path
