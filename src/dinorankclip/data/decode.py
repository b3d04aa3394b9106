"""Images made right before img2dataset decodes them: EXIF orientation applied, 16-bit samples scaled to 8 bits,
and images too large to decode safely refused.

img2dataset decodes with OpenCV's IMREAD_UNCHANGED, which ignores EXIF orientation (phone photos are stored
sideways) and keeps 16-bit samples that its JPEG encoder then saturates (a 16-bit PNG is stored white). Pillow
reads a file's header and EXIF without decoding the pixels, so every download is looked at first, and only an
image that needs a fix is decoded by Pillow, fixed, and handed on as a lossless 8-bit PNG (img2dataset then resizes
and encodes it as any other). Each fix is recorded beside the staging shards under the sha256 of the downloaded
bytes, which img2dataset keeps for every sample, so the data stage counts the fixes among the samples it stored.

img2dataset builds its resizer inside `download()` and offers no hook for it, so `upright_images` puts the
subclass in place of `img2dataset.main.Resizer` for the duration of one download (the workers it spawns receive
the resizer object itself, pickled); nothing in img2dataset's files changes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import io
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from img2dataset.resizer import Resizer
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION, SIXTEEN_BIT = "exif_orientation", "16_bit"
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb threshold (~89.5 Mpx)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ONE_CHANNEL_16 = {"I;16", "I;16L", "I;16B", "I;16N"}


class UnusableImage(ValueError):
    """An image that is refused rather than stored wrong."""


def bit_depth(data: bytes, img: Image.Image) -> int:
    """Bits per sample of a PNG (its IHDR) or TIFF (BitsPerSample); 8 for other formats, whose decoders give 8."""
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return data[24]
    if img.format == "TIFF":
        return max(img.tag_v2.get(258, (8,)))
    return 8


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = as stored); 1 when the EXIF block does not parse."""
    try:
        return img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block says nothing about orientation
        return 1


def to_8_bit(img: Image.Image) -> Image.Image:
    """One-channel 16-bit samples scaled (0..65535 -> 0..255); Pillow already reads multi-channel 16-bit as 8-bit."""
    if img.mode in ONE_CHANNEL_16:
        return Image.fromarray(np.rint(np.asarray(img, dtype=np.float32) / 257).astype(np.uint8), "L")
    if img.mode in ("I", "F"):
        raise UnusableImage(f"{img.mode} pixels ({'32-bit integer' if img.mode == 'I' else 'floating point'}) with no "
                            "known range are not stored")
    return img


def upright_8_bit(data: bytes) -> tuple[bytes | None, list[str]]:
    """(a lossless 8-bit PNG of the image as it should be seen, the fixes it took) for an image that needs one;
    (None, []) for one that does not, or that Pillow cannot read (OpenCV then has its say)."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise UnusableImage(f"decompression bomb: {err}") from err
    except (UnidentifiedImageError, OSError, ValueError):
        return None, []
    with img:
        if img.width * img.height > MAX_PIXELS:
            raise UnusableImage(f"decompression bomb: {img.width}x{img.height} pixels, over the limit of {MAX_PIXELS}")
        fixes = []
        if bit_depth(data, img) > 8 or img.mode in ONE_CHANNEL_16 | {"I", "F"}:
            fixes.append(SIXTEEN_BIT)
        if orientation(img) in range(2, 9):
            fixes.append(EXIF_ORIENTATION)
        if not fixes:
            return None, []
        try:
            img.load()
        except OSError as err:
            raise UnusableImage(f"does not decode: {err}") from err
        fixed = to_8_bit(ImageOps.exif_transpose(img))
        if fixed.mode not in ("L", "RGB", "RGBA"):
            fixed = fixed.convert("RGBA" if "A" in fixed.mode or "transparency" in fixed.info else "RGB")
        out = io.BytesIO()
        fixed.save(out, format="PNG", compress_level=1)
        return out.getvalue(), fixes


class UprightResizer(Resizer):
    """img2dataset's resizer, fed the fixed image where one is needed; fixes are recorded under `fixes_dir`."""

    def __init__(self, *args, fixes_dir: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fixes_dir = fixes_dir

    def __call__(self, img_stream, *args, **kwargs):
        data = img_stream.getvalue()
        try:
            fixed, fixes = upright_8_bit(data)
        except UnusableImage as err:
            return None, None, None, None, None, str(err)
        if fixed is None:
            return super().__call__(img_stream, *args, **kwargs)
        result = super().__call__(io.BytesIO(fixed), *args, **kwargs)
        if result[-1] is None:
            self.record(hashlib.sha256(data).hexdigest(), fixes)
        return result

    def record(self, sha256: str, fixes: list[str]) -> None:
        """One line per fixed image, appended to this process's file (one write: threads do not interleave)."""
        fd = os.open(Path(self.fixes_dir) / f"{os.getpid()}.tsv", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, f"{sha256}\t{','.join(fixes)}\n".encode())
        finally:
            os.close(fd)


@contextlib.contextmanager
def upright_images(fixes_dir: Path) -> Iterator[None]:
    """Within the block, img2dataset's `download()` builds an `UprightResizer` recording into `fixes_dir`."""
    img2dataset_main = importlib.import_module("img2dataset.main")  # the package's `main` is also a function

    if img2dataset_main.Resizer is not Resizer:
        raise RuntimeError("img2dataset.main no longer builds img2dataset.resizer.Resizer; the EXIF orientation and "
                           "bit-depth fixes (dinorankclip.data.decode) need updating for this img2dataset version")
    fixes_dir.mkdir(parents=True, exist_ok=True)
    img2dataset_main.Resizer = functools.partial(UprightResizer, fixes_dir=str(fixes_dir))
    try:
        yield
    finally:
        img2dataset_main.Resizer = Resizer


def count_fixes(fixes_dir: Path, stored_sha256: Iterator[str]) -> dict[str, int]:
    """How many of the stored samples (given by the sha256 of their downloaded bytes) each fix was applied to."""
    fixed: dict[str, set[str]] = {}
    for path in sorted(fixes_dir.glob("*.tsv")):
        for line in path.read_text().splitlines():
            sha256, _, fixes = line.partition("\t")
            if fixes:  # a line cut by a kill has no fixes column
                fixed[sha256] = set(fixes.split(","))
    counts = Counter(fix for sha256 in stored_sha256 for fix in fixed.get(sha256, ()))
    return {fix: counts.get(fix, 0) for fix in (EXIF_ORIENTATION, SIXTEEN_BIT)}
