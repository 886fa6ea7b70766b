"""PQ input: COCO panoptic PNGs and in-memory id maps, as (H, W) integer id maps (0 = void).

A COCO panoptic PNG stores the id ``R + 256 G + 256^2 B`` of every pixel. The fast path reads the
PNG container itself (PNG specification: signature, chunks with CRC-32, IHDR, IDAT, IEND), inflates
the image data with zlib-ng (several times faster than zlib, which dominates every PNG library's
decoding time here) and hands the filtered scanlines to the C helper, which undoes the row filters
and writes uint32 ids in the same pass. It covers 8-bit grey / RGB / RGBA non-interlaced PNGs
(everything the COCO panoptic tools and OpenCV write); any other PNG, and every PNG when the helper
is not built, is decoded by OpenCV and converted without int64 intermediates. A damaged file
(bad critical-chunk CRC, truncated, bad zlib stream) is a ``DataError`` naming the problem.
"""
from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from sepsnet.data.panoptic_ids import rgb_to_id
from sepsnet.errors import DataError
from sepsnet.eval import pq_native

try:  # zlib-ng: the same zlib stream format, inflated several times faster
    from zlib_ng import zlib_ng as _inflate_lib
except ImportError:  # pragma: no cover - zlib-ng is a dependency; stdlib zlib gives the same bytes
    _inflate_lib = zlib

__all__ = ["as_id_map", "decode_id_png", "parse_png", "read_id_png", "rgb_to_id"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 8-bit colour types of the fast path -> bytes per pixel (0 grey, 2 RGB, 6 RGBA)
FAST_COLOR_TYPES = {0: 1, 2: 3, 6: 4}
CRITICAL_CHUNKS = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
MAX_PIXELS = 1 << 30  # as OpenCV's default limit: larger is a damaged or hostile header


@dataclass
class PngImage:
    """The parts of a PNG the fast path needs: size, bytes per pixel, the compressed image data."""

    width: int
    height: int
    channels: int
    idat: list[bytes] = field(default_factory=list)


def parse_png(data: bytes, path: str) -> PngImage | None:
    """The chunks of an 8-bit grey/RGB/RGBA non-interlaced PNG; None for any other file (OpenCV's
    job); DataError for a damaged PNG."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    view = memoryview(data)
    pos, image = len(PNG_SIGNATURE), None
    while True:
        if pos + 12 > len(data):
            raise DataError(f"panoptic PNG {path} is truncated (no IEND chunk)")
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            raise DataError(f"panoptic PNG {path} is truncated (chunk {kind!r} needs {length} bytes)")
        body = view[pos + 8:end]
        if kind in CRITICAL_CHUNKS and zlib.crc32(body, zlib.crc32(kind)) != struct.unpack_from(">I", data, end)[0]:
            raise DataError(f"panoptic PNG {path} is damaged (CRC error in chunk {kind.decode('latin-1')})")
        if kind == b"IHDR":
            if length != 13:
                raise DataError(f"panoptic PNG {path} has a malformed IHDR chunk")
            width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or color not in FAST_COLOR_TYPES or compression or filtering or interlace:
                return None
            image = PngImage(width, height, FAST_COLOR_TYPES[color])
        elif kind == b"IDAT":
            if image is None:
                raise DataError(f"panoptic PNG {path} is malformed (IDAT before IHDR)")
            image.idat.append(body)
        elif kind == b"IEND":
            if image is None or not image.idat:
                raise DataError(f"panoptic PNG {path} is malformed (no IHDR or no IDAT chunk)")
            return image
        pos = end + 4


# inflated bytes per step: the scanlines stay in the CPU cache between inflate and unfilter
INFLATE_STEP = 1 << 18


def decode_id_png(data: bytes, path: str, native: ModuleType, out: np.ndarray | None = None) -> np.ndarray | None:
    """(H, W) uint32 ids of a PNG file's bytes with the C helper ``native`` (written into ``out``
    when that is a C-contiguous uint32 array of this size); None when the PNG is outside the fast
    path (see ``parse_png``). The image data is inflated a few hundred kB at a time and each block
    of whole scanlines unfiltered at once."""
    png = parse_png(data, path)
    if png is None:
        return None
    if png.height * png.width > MAX_PIXELS:
        raise DataError(f"panoptic PNG {path} is too large ({png.width} x {png.height} pixels)")
    reusable = (out is not None and out.shape == (png.height, png.width) and out.dtype == np.uint32
                and out.flags.c_contiguous and out.flags.writeable)
    ids = out if reusable else np.empty((png.height, png.width), np.uint32)
    line = 1 + png.width * png.channels
    step = max(1, INFLATE_STEP // line) * line
    inflater = _inflate_lib.decompressobj()
    compressed, pending, row = b"".join(png.idat), b"", 0
    try:
        while row < png.height:
            block = inflater.decompress(compressed, min(step, (png.height - row) * line) - len(pending))
            compressed = inflater.unconsumed_tail
            if not block:
                raise DataError(f"panoptic PNG {path} is truncated (image data ends at row {row} of {png.height})")
            block = pending + block if pending else block
            rows = len(block) // line
            native.unfilter_ids(memoryview(block)[:rows * line], row, png.width, png.channels, ids)
            pending, row = block[rows * line:], row + rows
    except (zlib.error, getattr(_inflate_lib, "error", zlib.error)) as exc:
        raise DataError(f"panoptic PNG {path} is damaged (image data: {exc})") from None
    except ValueError as exc:  # an unknown filter type
        raise DataError(f"panoptic PNG {path} is damaged ({exc})") from None
    if png.channels == 4:  # the helper keeps alpha in the top byte
        np.bitwise_and(ids, 0xFFFFFF, out=ids)
    return ids


def read_id_png(path: str, out: np.ndarray | None = None) -> np.ndarray:
    """Read a COCO panoptic PNG into an (H, W) id map (uint32 for RGB; DataError if unreadable).

    16-bit grey PNGs are returned as they are (their value is the id). ``out``: an earlier result
    whose memory may be reused (the fast path writes into it when the size matches)."""
    native = pq_native.NATIVE
    if native is None:
        import cv2  # not on the fast path, which runs without it (and its import time)

        return _cv2_ids(cv2.imread(path, cv2.IMREAD_UNCHANGED), path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read panoptic PNG {path} ({exc.strerror or exc})") from None
    if not data:
        raise DataError(f"cannot read panoptic PNG {path} (empty file)")
    ids = decode_id_png(data, path, native, out)
    if ids is None:
        import cv2

        ids = _cv2_ids(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), path)
    return ids


def _cv2_ids(img: np.ndarray | None, path: str) -> np.ndarray:
    """Ids of an image decoded by OpenCV (BGR order): ``cvtColor`` BGR -> RGBA lays every pixel out
    as the little-endian word ``R | G << 8 | B << 16 | A << 24`` and one AND drops the alpha byte."""
    if img is None:
        raise DataError(f"cannot read panoptic PNG {path} (missing or not an image)")
    if img.ndim == 2 and img.dtype in (np.uint8, np.uint16):
        return img
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.dtype != np.uint8:
        raise DataError(f"panoptic PNG {path} must be 8-bit RGB(A), got shape {img.shape} {img.dtype}")
    if sys.byteorder != "little":  # pragma: no cover
        return rgb_to_id(img[..., :3], bgr=True)
    import cv2

    code = cv2.COLOR_BGR2RGBA if img.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
    ids = cv2.cvtColor(img, code).view(np.uint32)[..., 0]  # R | G << 8 | B << 16 | A << 24
    np.bitwise_and(ids, 0xFFFFFF, out=ids)
    return ids


def as_id_map(arr: np.ndarray, what: str) -> np.ndarray:
    """An in-memory id map: integer (H, W) as it is, (H, W, 3|4) uint8 RGB(A) converted;
    DataError naming ``what`` otherwise."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and arr.dtype == np.uint8:
        return rgb_to_id(arr[..., :3])
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{what} must be an integer (H, W) id map or (H, W, 3) uint8 RGB, "
                        f"got shape {arr.shape} dtype {arr.dtype}")
    return arr
