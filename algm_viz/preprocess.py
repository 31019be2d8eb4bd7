"""Images in, model inputs out: reading files safely, validation and normalisation.

Every image and label map this project reads goes through :func:`read_image` / :func:`read_label`:
the pixel count is checked from the file header before anything is decoded, the EXIF orientation is
applied, palette (P-mode) label maps give their indices, and only plain raster formats are opened
(no format whose plugin runs an external program).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torch import Tensor

__all__ = ["to_rgb_uint8", "normalize", "ImageError", "read_image", "read_label", "check_label", "MAX_PIXELS",
           "IMAGE_FORMATS"]

#: Largest image (width × height) any reader decodes; also PIL's decompression-bomb limit.
MAX_PIXELS = 64_000_000
#: Formats PIL may open (header sniffing is limited to these).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")

PIL.Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """An input that cannot be used as an image, with the reason."""


def _open_checked(path: str | Path | bytes, max_pixels: int, what: str, name: str | None = None) -> PIL.Image.Image:
    """The decoded, EXIF-oriented image at ``path`` (or in these bytes, called ``name`` in messages); refuses
    files over ``max_pixels`` from the header."""
    if isinstance(path, bytes):
        name = name or "the image"
        if not path:
            raise ImageError(f"{name}: an empty file")
        source: str | Path | io.BytesIO = io.BytesIO(path)
    else:
        name, source = Path(path).name, path
        if not Path(path).is_file() or Path(path).stat().st_size == 0:
            raise ImageError(f"{name}: no such file or an empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(source, formats=IMAGE_FORMATS)  # reads the header only
    except PIL.Image.DecompressionBombError:
        raise ImageError(f"{name} is larger than {max_pixels // 1_000_000} megapixels: refused") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(f"{name} is not {what} this app can read (corrupt file or unsupported format)") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(f"{name} is {width}×{height} pixels; at most {max_pixels // 1_000_000} megapixels are accepted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageError(f"{name} is not {what} this app can read ({error})") from None
    finally:
        image.close()


def _native(array: np.ndarray) -> np.ndarray:
    """``array`` in native byte order (PIL gives big-endian arrays for some 16-bit modes)."""
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def read_image(path: str | Path | bytes, max_pixels: int = MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Image file (or a file's bytes read in memory, e.g. a zip member, called ``name`` in messages) ->
    ``[H, W, 3]`` uint8 RGB, upright (EXIF orientation applied).

    Gray, gray+alpha, palette, RGB(A), CMYK, 16-bit gray and float images are accepted; alpha is dropped.
    Raises :class:`ImageError` for files that are no image and images over ``max_pixels``.
    """
    image = _open_checked(path, max_pixels, "an image", name)
    if image.mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBa", "La"):
        image = image.convert("RGBA" if image.mode in ("PA", "RGBa") or "transparency" in image.info else "RGB")
    return to_rgb_uint8(_native(np.array(image)))


def read_label(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Label-map file -> ``[H, W]`` class ids as stored (uint8, or uint16/int32 for 16-/32-bit maps).

    A palette (P-mode) PNG gives its indices, not its colours; a gray image stored as RGB gives its one
    channel. Raises :class:`ImageError` for a colour-coded label map (channels differ), files that are
    no image and maps over ``max_pixels``.
    """
    image = _open_checked(path, max_pixels, "a label map")
    if image.mode == "1":
        image = image.convert("L")
    array = _native(np.array(image))
    if array.ndim == 3:
        colour = array[..., :3] if array.shape[2] >= 3 else array[..., :1]
        if (colour != colour[..., :1]).any():
            raise ImageError(f"{Path(path).name} is a colour image: a label map stores one class id per pixel "
                             "(a gray or palette PNG)")
        array = colour[..., 0]
    return np.ascontiguousarray(array)


def check_label(label: np.ndarray, num_classes: int, ignore_index: int) -> tuple[np.ndarray, str | None]:
    """Class ids ``[H, W]`` -> (``[H, W]`` integers with values outside ``0..num_classes-1`` set to
    ``ignore_index``, a note saying how many pixels were ignored and why, or None when only
    ``ignore_index`` pixels were).

    The result keeps the stored integer type where it holds ``ignore_index`` (uint8 for an 8-bit map and
    ignore 255): a map at the pixel limit costs about three bytes a pixel here, not the 8-byte copies an
    int64 conversion makes (64 MP: about 200 MB instead of 1 GB). Raises :class:`ImageError` when no pixel
    holds a class of the model (the mIoU would be empty).
    """
    stored = np.asarray(label)
    values = stored if stored.dtype.kind in "ui" else stored.astype(np.int64)
    valid = np.less(values, num_classes)
    if values.dtype.kind == "i":
        valid &= values >= 0
    bits = f"{stored.dtype.itemsize * 8}-bit "
    if not valid.any():
        raise ImageError(f"the label map has no pixel with a class id in 0..{num_classes - 1} ({bits}values "
                         f"{int(values.min())}..{int(values.max())}): it is not a label map for this model")
    out = values.astype(np.result_type(values.dtype, np.min_scalar_type(ignore_index)), copy=True)
    invalid = np.logical_not(valid, out=valid)
    out[invalid] = ignore_index
    outside = np.logical_and(invalid, np.not_equal(values, ignore_index), out=invalid)
    count = int(np.count_nonzero(outside))
    if not count:
        return out, None
    found = np.unique(values[outside])
    shown = ", ".join(str(int(v)) for v in found[:5]) + (", …" if len(found) > 5 else "")
    note = (f"{100.0 * count / outside.size:.1f} % of the label map's pixels hold values outside the model's classes "
            f"0..{num_classes - 1} ({bits}map; values {shown}): they are ignored")
    return out, note


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D numeric array (gray, gray+alpha, RGB, RGBA; 8/16-bit or float in [0, 1]) -> ``[H, W, 3]`` uint8."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or min(array.shape[:2]) == 0:
        raise ImageError(f"expected an H×W, H×W×3 or H×W×4 image, got shape {array.shape}")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("image has NaN or infinite values")
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0
        array = np.clip(array * scale, 0, 255).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        array = np.clip(array, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"unsupported pixel type {array.dtype}")
    channels = array.shape[2]
    if channels in (1, 2):
        array = np.repeat(array[..., :1], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu") -> Tensor:
    """``[H, W, 3]`` uint8 -> ``[1, 3, H, W]`` float, ``(x / 255 - mean) / std``."""
    tensor = torch.from_numpy(to_rgb_uint8(image)).to(device).permute(2, 0, 1)[None].float().div_(255)
    mean_t = torch.tensor(mean, device=tensor.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=tensor.device).view(1, 3, 1, 1)
    return (tensor - mean_t) / std_t
