"""For the serving tests: real PNGs, PNGs that only declare a size, photos stored the way a phone
stores them (EXIF orientation), the model deployment without Ray, and a free loopback port."""

from __future__ import annotations

import io
import socket
import struct
import zlib

import numpy as np
from PIL import Image


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` with a few bytes of pixel data: how a
    decompression bomb or a zero-size image looks before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def encoded(arr: np.ndarray, fmt: str = "PNG", orientation: int | None = None, **save) -> bytes:
    """``arr`` as an image file; with ``orientation``, stored the way a phone stores it: the pixels
    turned so that applying the EXIF ``orientation`` shows ``arr`` (6: turn 90 degrees clockwise)."""
    img = Image.fromarray(arr)
    exif = Image.Exif()
    if orientation is not None:
        stored = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
        img = img.transpose(stored[orientation])
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif.tobytes(), **save)
    return buf.getvalue()


class InProcessModel:
    """serve/app.py's model deployment as a plain object (its class, without Ray), behind the
    ingress's ``Backend`` protocol; ``payloads`` keeps what the ingress sent it."""

    def __init__(self, settings: dict):
        from serve.app import TryOnModel

        self.model = TryOnModel.func_or_class(settings)
        self.payloads: list[dict] = []

    async def tryon(self, payload: dict) -> dict:
        self.payloads.append(payload)
        return await self.model.tryon(payload)

    async def info(self) -> dict:
        return self.model.info()

    async def models(self) -> dict:
        return self.model.models()


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on now (for a Serve instance of one test module)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
