"""sepsnet-pq's own PNG decoding (chunks + zlib-ng + the C unfilter) against OpenCV (libpng), on
PNGs written by OpenCV, by PIL (as panopticapi writes them) and by a small encoder here that uses
every PNG filter type; damaged files give a DataError; the C helper and the fallback agree."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from sepsnet.errors import DataError
from sepsnet.eval import panoptic_png, pq_native
from sepsnet.eval.panoptic_png import read_id_png

needs_native = pytest.mark.skipif(
    pq_native.NATIVE is None,
    reason="C helper sepsnet.eval._pq_native not built (pip install -e . builds it) or SEPSNET_PQ_NATIVE=0")


# ---------------------------------------------------------------- a minimal PNG encoder (PNG spec 9.2)
def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def encode_png(pixels: np.ndarray, filters: list[int], idat_size: int = 997) -> bytes:
    """8-bit grey / RGB / RGBA PNG with the given filter type per row, the data split over IDATs."""
    h, w = pixels.shape[:2]
    c = 1 if pixels.ndim == 2 else pixels.shape[2]
    raw, prev = bytearray(), np.zeros(w * c, np.int32)
    for y in range(h):
        cur = pixels[y].reshape(-1).astype(np.int32)
        left = np.concatenate([np.zeros(c, np.int32), cur[:-c]])
        upleft = np.concatenate([np.zeros(c, np.int32), prev[:-c]])
        predictor = {0: 0, 1: left, 2: prev, 3: (left + prev) // 2, 4: _paeth(left, prev, upleft)}.get(filters[y], 0)
        raw += bytes([filters[y]]) + ((cur - predictor) % 256).astype(np.uint8).tobytes()
        prev = cur
    data = zlib.compress(bytes(raw), 6)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    idats = b"".join(_chunk(b"IDAT", data[i:i + idat_size]) for i in range(0, len(data), idat_size))
    return panoptic_png.PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"tEXt", b"k\0v") + idats + \
        _chunk(b"IEND", b"")


# ---------------------------------------------------------------- images
def id_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Piecewise-constant 24-bit ids (boxes over bands), as COCO panoptic PNGs hold them."""
    ids = np.repeat(rng.integers(0, 1 << 24, (4, 1)), -(-h // 4), 0)[:h].repeat(w, 1)
    for _ in range(12):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        ids[y:y + int(rng.integers(1, h + 1)), x:x + int(rng.integers(1, w + 1))] = rng.integers(0, 1 << 24)
    return ids


def rgb_of(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], -1).astype(np.uint8)


def ids_of(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def images(rng: np.random.Generator) -> list[np.ndarray]:
    """RGB(A) and grey, piecewise constant and noise (which takes the full Paeth path), odd widths."""
    out = []
    for h, w in ((23, 37), (5, 1), (16, 64), (1, 9)):
        rgb = rgb_of(id_image(rng, h, w))
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        out += [rgb, noise, np.concatenate([rgb, alpha], 2), rgb[..., 0], noise[..., 1]]
    return out


def test_every_filter_type_decodes_like_libpng(tmp_path, pq_path) -> None:
    rng = np.random.default_rng(3)
    for i, img in enumerate(images(rng)):
        h = img.shape[0]
        for filters in ([0] * h, [1] * h, [2] * h, [3] * h, [4] * h, rng.integers(0, 5, h).tolist()):
            path = str(tmp_path / f"{i}.png")
            with open(path, "wb") as f:
                f.write(encode_png(img, filters))
            want = img.astype(np.int64) if img.ndim == 2 else ids_of(img[..., :3])
            got = read_id_png(path)
            assert got.shape == want.shape and np.array_equal(got, want), (i, filters[:3], img.shape)
            if pq_path == "native":  # decoded by the helper, not handed on to OpenCV
                data = open(path, "rb").read()
                assert panoptic_png.decode_id_png(data, path, pq_native.NATIVE) is not None
            if img.ndim == 3:  # and libpng reads the same pixels from the file
                np.testing.assert_array_equal(cv2.imread(path, cv2.IMREAD_UNCHANGED)[..., 2::-1], img[..., :3])


def test_files_written_by_opencv_and_pil(tmp_path, pq_path) -> None:
    rng = np.random.default_rng(4)
    for i, img in enumerate(images(rng)):
        want = img.astype(np.int64) if img.ndim == 2 else ids_of(img[..., :3])
        by_cv2, by_pil = str(tmp_path / f"cv2_{i}.png"), str(tmp_path / f"pil_{i}.png")
        cv2.imwrite(by_cv2, img if img.ndim == 2 else img[..., [2, 1, 0, 3][:img.shape[2]]])
        Image.fromarray(img).save(by_pil)
        for path in (by_cv2, by_pil):
            got = read_id_png(path)
            assert np.array_equal(got, want), (path, img.shape)
            if img.ndim == 3:
                assert got.dtype == np.uint32


def test_pil_uses_the_filters_this_decoder_must_undo(tmp_path) -> None:
    """PIL (panopticapi's writer) picks a filter per row: Up and Paeth besides Sub on id maps."""
    ids = id_image(np.random.default_rng(5), 200, 300)
    Image.fromarray(rgb_of(ids)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    png = panoptic_png.parse_png(data, "a.png")
    raw = zlib.decompress(b"".join(png.idat))
    filters = set(np.frombuffer(raw, np.uint8).reshape(200, -1)[:, 0].tolist())
    assert len(filters) >= 2, filters
    np.testing.assert_array_equal(read_id_png(str(tmp_path / "a.png")), ids)


def test_other_pngs_go_to_opencv(tmp_path, pq_path) -> None:
    rng = np.random.default_rng(6)
    grey16 = rng.integers(0, 1 << 16, (7, 11), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    got = read_id_png(str(tmp_path / "g16.png"))
    assert got.dtype == np.uint16 and np.array_equal(got, grey16)
    ids = id_image(rng, 9, 10)
    Image.fromarray(rgb_of(ids)).convert("P").convert("RGB").save(tmp_path / "rgb.png")
    palette_rgb = np.asarray(Image.open(tmp_path / "rgb.png"))
    Image.fromarray(palette_rgb).convert("P").save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_id_png(str(tmp_path / "p.png")), ids_of(palette_rgb))


def _damaged(data: bytes) -> dict[str, bytes]:
    """name -> damaged copy of a PNG with at least two IDAT chunks."""
    first_idat = data.index(b"IDAT") - 4
    length = struct.unpack_from(">I", data, first_idat)[0]
    crc_error = bytearray(data)
    crc_error[first_idat + 8 + length // 2] ^= 0xFF
    iend = data.index(b"IEND") - 4
    return {
        "truncated": data[:len(data) // 2],
        "no IEND": data[:iend],
        "CRC error": bytes(crc_error),
        "short image data": data[:first_idat] + _chunk(b"IDAT", zlib.compress(b"\x00" * 7)) + data[iend:],
        "bad zlib stream": data[:first_idat] + _chunk(b"IDAT", b"not zlib at all") + data[iend:],
        "not an image": b"hello, world",
        "empty": b"",
    }


@needs_native
def test_damaged_files_raise_data_error(tmp_path) -> None:
    img = rgb_of(id_image(np.random.default_rng(7), 40, 50))
    good = encode_png(img, [4] * 40, idat_size=64)
    for name, data in {**_damaged(good), "filter type 7": encode_png(img, [1] * 20 + [7] * 20)}.items():
        path = tmp_path / "bad.png"
        path.write_bytes(data)
        with pytest.raises(DataError, match="bad.png") as err:
            read_id_png(str(path))
        assert "\n" not in str(err.value), name
    with pytest.raises(DataError, match="cannot read"):
        read_id_png(str(tmp_path / "missing.png"))
    messages = {}
    for name in ("truncated", "CRC error", "filter type 7"):
        data = _damaged(good).get(name) or encode_png(img, [1] * 20 + [7] * 20)
        (tmp_path / "bad.png").write_bytes(data)
        with pytest.raises(DataError) as err:
            read_id_png(str(tmp_path / "bad.png"))
        messages[name] = str(err.value)
    assert "truncated" in messages["truncated"]
    assert "CRC" in messages["CRC error"]
    assert "filter type 7" in messages["filter type 7"]


@needs_native
def test_decoding_into_an_earlier_result(tmp_path) -> None:
    rng = np.random.default_rng(8)
    a, b = rgb_of(id_image(rng, 30, 40)), rgb_of(id_image(rng, 30, 40))
    for name, img in (("a.png", a), ("b.png", b), ("small.png", a[:10])):
        (tmp_path / name).write_bytes(encode_png(img, [4] * len(img)))
    first = read_id_png(str(tmp_path / "a.png"))
    again = read_id_png(str(tmp_path / "b.png"), out=first)
    assert again is first and np.array_equal(again, ids_of(b))
    small = read_id_png(str(tmp_path / "small.png"), out=first)  # another size: a new array
    assert small is not first and np.array_equal(small, ids_of(a[:10])) and np.array_equal(first, ids_of(b))


@needs_native
def test_huge_header_is_refused(tmp_path) -> None:
    data = encode_png(rgb_of(id_image(np.random.default_rng(9), 4, 4)), [0] * 4)
    huge = data.replace(data[8:8 + 25], _chunk(b"IHDR", struct.pack(">IIBBBBB", 70000, 70000, 8, 2, 0, 0, 0)))
    (tmp_path / "huge.png").write_bytes(huge)
    with pytest.raises(DataError, match="too large"):
        read_id_png(str(tmp_path / "huge.png"))
