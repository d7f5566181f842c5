"""Panoramas a user gives as views of a tour (image-to-tour): decoded, checked, fitted to the tour's size."""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffpano.io import storage

MAX_GIVEN_PIXELS = 8192 * 4096  # a given panorama larger than this is refused before it is decoded
MAX_INLINE_IMAGE_BYTES = 8 << 20  # a panorama given inline (a data: URI in a request or a spec), once decoded
DATA_URI = re.compile(r"^data:image/(png|jpeg);base64,")  # how a panorama is given inline


def decode_panorama(data: bytes, field: str) -> np.ndarray:
    """(H, W, 3) uint8 of an image file's bytes (PNG, JPEG, ...); ValueError naming field unless it decodes, is
    2:1 equirectangular and holds at most MAX_GIVEN_PIXELS."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only: the size is known before decoding
            width, height = im.size
            if width * height > MAX_GIVEN_PIXELS:
                raise ValueError(f"{field}: {width}x{height} is larger than {MAX_GIVEN_PIXELS} pixels")
            if width != 2 * height:
                raise ValueError(f"{field}: a panorama must be 2:1 equirectangular (width = 2 x height), got "
                                 f"{width}x{height}")
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{field}: not an image that can be decoded ({type(err).__name__})") from None


def fit_panorama(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, str | None]:
    """The panorama at the tour's size (Lanczos when it is not), and a note saying so (None when it already was)."""
    if image.shape[:2] == (height, width):
        return image, None
    note = f"resized {image.shape[0]}x{image.shape[1]} -> {height}x{width} (the tour's size)"
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS)), note


def check_views(indices, views: int, field: str) -> None:
    """ValueError naming field unless every given view index lies in the tour (0 to views - 1)."""
    outside = sorted(i for i in indices if not 0 <= i < views)
    if outside:
        raise ValueError(f"{field}: view {outside[0]} is outside the tour's {views} views (0 to {views - 1})")


def known_views(given: dict[int, np.ndarray], views: int, height: int, width: int,
                field: str) -> tuple[dict[int, np.ndarray], list[str]]:
    """The pipeline's known_views from given panoramas by view index, fitted to the tour's size, with a note for
    each one resized; ValueError naming field for an index outside the tour."""
    check_views(given, views, field)
    fitted, notes = {}, []
    for index, image in sorted(given.items()):
        fitted[index], note = fit_panorama(image, height, width)
        if note:
            notes.append(f"{field} {index}: {note}")
    return fitted, notes


def is_inline(value: str) -> bool:
    """Whether a given panorama is inline (a data: URI) rather than a file's URI."""
    return bool(DATA_URI.match(value))


def given_bytes(value: str, field: str) -> bytes:
    """The image file bytes of a given panorama: a data: URI's payload (its size bounded by the spec), or the file
    at an s3:// URI or absolute path; ValueError naming field."""
    if not is_inline(value):
        try:
            return storage.read_bytes(value)
        except FileNotFoundError:
            raise ValueError(f"{field}: there is no file {value!r}") from None
    try:
        return base64.b64decode(value[DATA_URI.match(value).end():], validate=True)
    except binascii.Error:
        raise ValueError(f"{field}: the data: URI's payload is not base64") from None


def read_given(images: dict[int, str], field: str = "images") -> dict[int, np.ndarray]:
    """Given panoramas (view index -> data: URI or file URI) decoded; ValueError naming field.INDEX."""
    return {i: decode_panorama(given_bytes(v, f"{field}.{i}"), f"{field}.{i}") for i, v in sorted(images.items())}
