"""Image preprocessing as in the study: read, grayscale, resize, min-max scale, uint8, histogram equalization.

The steps follow the group's public code (``chestx/data/csv_data_preprocess.py``), in this order:

1. read: PNG/JPEG (8- or 16-bit) via Pillow, DICOM via pydicom. DICOM ``MONOCHROME1`` images (bright =
   low attenuation) are inverted to the ``MONOCHROME2`` convention (``max - x``), so bone is always bright.
   Stored values are used as they are: no rescale slope/intercept or VOI LUT (linear maps do not change
   the result of step 3).
2. grayscale: colour images are converted with Pillow's ITU-R 601-2 luma transform.
3. resize to ``size x size`` pixels, aspect ratio not preserved (as the study); with ``letterbox`` the
   longer side is scaled to ``size`` and the image is centred on a black square instead. Resampling is
   Pillow's bilinear filter on float32 pixels, which averages over the whole footprint when shrinking
   (the group used ``scipy.ndimage.zoom(order=2)`` without anti-aliasing).
4. min-max scale to [0, 1]: ``(x - min) / (max - min)`` over the resized image (the letterbox padding is
   not part of it). A constant image has no range and is rejected as blank.
5. uint8: ``round(255 * x)`` (round half to even).
6. histogram equalization (optional, on by default): OpenCV's ``equalizeHist`` formula in numpy (see
   `equalize_histogram`). With ``letterbox`` only the image area is equalized; the padding stays 0.

Functions that cannot read an image raise `UnreadableImage` with a one-line reason; ``prepare`` records
the reason in the dataset card and skips the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DICOM_SUFFIXES = (".dcm", ".dicom")
"""File suffixes (lower case) read with pydicom; everything else is read with Pillow."""

PREPROCESS_VERSION = 1
"""Bumped whenever the pixels produced for the same settings change; part of the resume fingerprint."""


class UnreadableImage(Exception):
    """An image file that cannot be turned into pixels; ``str(error)`` is the reason shown in the card."""


@dataclass(frozen=True)
class PreprocessSettings:
    """How source images become cache rows.

    Attributes:
        size: output side length in pixels (images are ``size x size``).
        letterbox: keep the aspect ratio and pad with black instead of stretching.
        equalize: apply histogram equalization after quantization to uint8.
    """

    size: int = 224
    letterbox: bool = False
    equalize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 8:
            raise ValueError(f"size must be an integer number of pixels >= 8, got {self.size!r}")


def read_image(path: Path) -> np.ndarray:
    """Read one image file as a 2-D float32 array in display orientation (bright = dense).

    float32 holds every integer below 2**24 exactly, so 8- and 16-bit pixels are not rounded.

    Args:
        path: a PNG/JPEG (any Pillow format) or a DICOM file (suffix ``.dcm`` or ``.dicom``).

    Returns:
        Pixels [H, W] in the file's own value range (e.g. 0-255, 0-65535 or 0-4095).

    Raises:
        UnreadableImage: file missing, not decodable, DICOM without pixel data, or not a single 2-D frame.
    """
    if not path.is_file():
        raise UnreadableImage("file not found")
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path)
    return _read_pillow(path)


def _read_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
                pixels = np.asarray(image)
            else:  # RGB, RGBA, LA, P, CMYK, 1: luma conversion
                pixels = np.asarray(image.convert("L"))
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError... for corrupt files
        raise UnreadableImage(f"unreadable image ({type(error).__name__}: {error})") from error
    if pixels.ndim != 2:
        raise UnreadableImage(f"unexpected pixel array shape {pixels.shape}")
    return pixels.astype(np.float32)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom  # imported here: only DICOM datasets need it

    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:
        raise UnreadableImage(f"unreadable DICOM ({type(error).__name__}: {error})") from error
    if "PixelData" not in dataset:
        raise UnreadableImage("DICOM without pixel data")
    try:
        pixels = np.asarray(dataset.pixel_array)
    except Exception as error:  # e.g. a compressed transfer syntax without a decoder plugin
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise UnreadableImage(
            f"DICOM pixel data not decodable (transfer syntax {syntax}; {type(error).__name__}: {error}); "
            "install a decoder such as pylibjpeg for compressed DICOM"
        ) from error
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pixels.ndim == 3 and int(dataset.get("SamplesPerPixel", 1)) == 3:
        if pixels.dtype != np.uint8:
            raise UnreadableImage(f"colour DICOM with {pixels.dtype} samples is not supported (8-bit RGB only)")
        pixels = np.asarray(Image.fromarray(pixels).convert("L"))
    if pixels.ndim != 2:
        raise UnreadableImage(f"DICOM is not a single 2-D frame (pixel array shape {pixels.shape})")
    pixels = pixels.astype(np.float32)
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels


def resize(pixels: np.ndarray, size: int, letterbox: bool = False) -> np.ndarray:
    """Resample a 2-D image with Pillow's bilinear filter (area-averaging when shrinking).

    Args:
        pixels: [H, W] array of any real dtype.
        size: target side length in pixels.
        letterbox: if False the output is exactly ``size x size`` (aspect not preserved); if True the
            longer side becomes ``size`` and the shorter one ``max(1, round(size * short / long))``.

    Returns:
        float32 array, [size, size] or the letterboxed content shape.
    """
    height, width = pixels.shape
    if letterbox:
        scale = size / max(height, width)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
    else:
        target = (size, size)
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
    return np.asarray(image.resize(target, Image.Resampling.BILINEAR), dtype=np.float32)


def min_max_scale(pixels: np.ndarray) -> np.ndarray:
    """``(x - min) / (max - min)``: float64 values in [0, 1] with min 0 and max 1.

    Raises:
        UnreadableImage: the image is constant (a blank or failed acquisition), so it has no range.
    """
    low, high = float(pixels.min()), float(pixels.max())
    if not np.isfinite(low) or not np.isfinite(high):
        raise UnreadableImage("image contains non-finite pixel values")
    if high == low:
        raise UnreadableImage(f"blank image (every pixel equals {low:g})")
    return (pixels.astype(np.float64) - low) / (high - low)


def to_uint8(scaled: np.ndarray) -> np.ndarray:
    """Quantize values in [0, 1] to uint8 as ``round(255 * x)`` (half to even), clipped to [0, 255]."""
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def equalize_histogram(image: np.ndarray) -> np.ndarray:
    """Histogram equalization of a uint8 image, numerically as OpenCV's ``cv2.equalizeHist``.

    With ``h`` the 256-bin histogram, ``c`` its cumulative sum, ``v0`` the smallest value present and
    ``N`` the pixel count, value ``v`` maps to ``round((c[v] - h[v0]) * 255 / (N - h[v0]))`` computed in
    float32 (so ``v0`` maps to 0 and the largest value present to 255). A constant image is returned
    unchanged. Pixels equal to the minimum (e.g. letterbox padding) do not change the mapping of the others.

    Args:
        image: uint8 array of any shape.

    Returns:
        uint8 array of the same shape.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"equalize_histogram needs uint8 pixels, got {image.dtype}")
    histogram = np.bincount(image.ravel(), minlength=256)
    cumulative = np.cumsum(histogram)
    lowest = int(np.flatnonzero(histogram)[0])
    total = int(cumulative[-1])
    if histogram[lowest] == total:
        return image.copy()
    scale = np.float32(255.0) / np.float32(total - histogram[lowest])
    lut = np.round((cumulative - histogram[lowest]).astype(np.float32) * scale)
    lut[:lowest] = 0
    equalized: np.ndarray = np.clip(lut, 0, 255).astype(np.uint8)[image]
    return equalized


def preprocess_pixels(pixels: np.ndarray, settings: PreprocessSettings) -> np.ndarray:
    """Steps 3-6 of the module docstring: source pixels [H, W] -> uint8 [size, size]."""
    content = resize(pixels, settings.size, settings.letterbox)
    content = to_uint8(min_max_scale(content))
    if settings.equalize:
        content = equalize_histogram(content)
    if not settings.letterbox:
        return content
    canvas = np.zeros((settings.size, settings.size), dtype=np.uint8)
    top = (settings.size - content.shape[0]) // 2
    left = (settings.size - content.shape[1]) // 2
    canvas[top : top + content.shape[0], left : left + content.shape[1]] = content
    return canvas


def load_and_preprocess(path: Path, settings: PreprocessSettings) -> np.ndarray:
    """Read one file and preprocess it into a uint8 [size, size] cache row.

    Raises:
        UnreadableImage: with the reason the image cannot be used.
    """
    return preprocess_pixels(read_image(path), settings)
