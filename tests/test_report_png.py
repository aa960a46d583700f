"""The overlays' PNG encoder: what it writes is what Pillow (and every other decoder) reads back, byte for byte."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from lungsight.report.png import SIGNATURE, encode_png


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (64, 130, 3), (1, 1), (9, 4), (33, 70)])
def test_pillow_reads_back_the_exact_pixels(shape):
    a = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    png = encode_png(a)
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        assert im.format == "PNG" and im.mode == ("RGB" if len(shape) == 3 else "L")
        np.testing.assert_array_equal(np.asarray(im), a)


def test_the_file_is_made_of_checked_chunks_and_the_rows_use_the_sub_filter():
    a = np.array([[[10, 20, 30], [15, 5, 255]]], np.uint8)  # one row of two pixels
    png = encode_png(a)
    assert png.startswith(SIGNATURE)
    pos, kinds = len(SIGNATURE), []
    while pos < len(png):
        n = int.from_bytes(png[pos : pos + 4], "big")
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]
        assert int.from_bytes(png[pos + 8 + n : pos + 12 + n], "big") == zlib.crc32(kind + data)
        kinds.append(kind)
        if kind == b"IHDR":
            assert data == bytes([0, 0, 0, 2, 0, 0, 0, 1, 8, 2, 0, 0, 0])  # width 2, height 1, 8-bit RGB
        if kind == b"IDAT":
            # filter byte 1 (Sub), the first pixel as is, then each channel minus its left neighbour mod 256
            assert zlib.decompress(data) == bytes([1, 10, 20, 30, 5, 241, 225])
        pos += 12 + n
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4), np.float32), np.zeros((0, 4, 3), np.uint8)]
)
def test_anything_but_a_uint8_grey_or_rgb_image_is_refused(bad):
    with pytest.raises(ValueError, match="uint8"):
        encode_png(bad)
