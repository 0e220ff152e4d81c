"""Fast PNG and tar paths agree with PIL and with webdataset's tar iterator, and fall back for foreign files."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from ditscale.data.codec import encode_png, inflate_png, tar_index, unfilter_batch
from ditscale.data.stream import decode_sample, iter_shard, to_tensor

MANIFEST = {"kind": "pixels", "resolution": 16, "channels": 3, "image_key": "png"}


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16]
    smooth = (xx * 9 + yy * 3).astype(np.uint8)
    return [
        rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),  # noise: filter None
        np.stack([smooth, smooth.T, 255 - smooth], -1),  # gradients: Sub / Up
        np.repeat((yy * 13).astype(np.uint8)[:, :, None], 3, 2),
        np.zeros((16, 16, 3), np.uint8),
    ]


@pytest.mark.parametrize("level", [0, 6])
def test_png_roundtrip_matches_pil(level):
    arrs = images()
    blobs = [encode_png(a, level) for a in arrs]
    for a, b in zip(arrs, blobs, strict=True):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(b))), a)  # a standard PNG
        assert encode_png(a, level) == b  # deterministic
    rows = [inflate_png(b) for b in blobs]
    assert all(r is not None for r in rows)
    rows[1].flip = True
    out = unfilter_batch(rows)
    assert np.array_equal(out[0], arrs[0]) and np.array_equal(out[1], arrs[1][:, ::-1])
    assert np.array_equal(out[2], arrs[2]) and np.array_equal(out[3], arrs[3])
    gray = encode_png(arrs[0][:, :, 0], level)
    assert np.array_equal(inflate_png(gray).array()[:, :, 0], arrs[0][:, :, 0])


def test_foreign_png_and_jpeg_fall_back_to_pil():
    arr = images()[1]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # PIL's adaptive per-row filters
    sample = {"__key__": "00000007", "png": buf.getvalue(), "cls": b"3"}
    x, label, index = decode_sample(sample, MANIFEST, flip=True)
    assert (label, index) == (3, 7)
    t = to_tensor([x], "pixels")[0]
    expected = arr[:, ::-1].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    assert np.allclose(t.numpy(), expected)
    pal = io.BytesIO()
    Image.fromarray(arr).convert("P").save(pal, format="PNG")
    with pytest.raises(ValueError, match="shape"):  # a palette image is not (16, 16, 3): corrupt for this set
        decode_sample({"__key__": "1", "png": pal.getvalue(), "cls": b"0"}, MANIFEST, False)
    with pytest.raises(Exception):  # noqa: B017 - garbage is an error, which the stream counts as skipped
        decode_sample({"__key__": "1", "png": b"\x89PNG\r\n\x1a\nxxxx", "cls": b"0"}, MANIFEST, False)


def _tar(fmt, names) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in names:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_index_and_webdataset_fallback():
    members = [("00000001.png", b"a" * 700), ("00000001.cls", b"1"), ("00000002.png", b"b"), ("00000002.cls", b"2")]
    plain = _tar(tarfile.USTAR_FORMAT, members)
    index, why = tar_index(plain)
    assert why is None and [(n, plain[lo:hi]) for n, lo, hi in index] == members
    long_name = "d" * 120 + "/00000003"
    pax = _tar(tarfile.PAX_FORMAT, [*members, (long_name + ".png", b"c"), (long_name + ".cls", b"3")])
    keys = [s["__key__"] for s in iter_shard("pax.tar", pax)]  # pax headers: webdataset's iterator
    assert keys == ["00000001", "00000002", long_name]
    cut = plain[:1100]
    assert tar_index(cut)[1] is not None
    assert [s["__key__"] for s in iter_shard("cut.tar", cut)] == []  # the half sample is dropped


def test_sub_filtered_png_from_elsewhere_decodes():
    import struct
    import zlib

    from ditscale.data.codec import PNG_SIGNATURE, _chunk

    arr = images()[1]
    h, w, c = arr.shape
    flat = arr.reshape(h, w * c)
    sub = flat.copy()
    sub[:, c:] = flat[:, c:] - flat[:, :-c]
    raw = np.concatenate([np.ones((h, 1), np.uint8), sub], axis=1).tobytes()
    png = (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), arr)
    rows = inflate_png(png)
    assert rows.filter == 1 and np.array_equal(rows.array(), arr)
