"""Hostile images for tests of the pixel limits: small files that would decode into large arrays."""

from __future__ import annotations

import functools
import struct
import zlib


@functools.lru_cache(maxsize=4)
def png_bomb(width: int, height: int) -> bytes:
    """A black 8-bit greyscale PNG of ``width`` × ``height``, built row by row so neither the builder nor
    the file (zeros compress about 1000:1: 140 KB for 12000 × 12000) is large; decoding it would take
    ``width × height`` bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # bit depth 8, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
