"""File reading, list parsing and the on-disk pool cache shared by the dataset builders.

Every reader raises :class:`DatasetError` (a ``ValueError``) whose message names the file and says
what layout was expected, instead of a bare PIL/numpy traceback.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

__all__ = ["DatasetError", "CorruptFileError", "read_image", "read_label", "resolve_cache_dir", "PoolCache",
           "VOC_PALETTE", "rgb_mask_labels"]

log = logging.getLogger("benchmarks.datasets")

PathLike = Union[str, os.PathLike]

# bump when the meaning of cached content changes
CACHE_VERSION = 1


class DatasetError(ValueError):
    """Bad dataset input: a missing/corrupt file, a malformed list or mask. The message names the file."""

    def __init__(self, message: str, path: Optional[PathLike] = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class CorruptFileError(DatasetError):
    """A single file is missing or cannot be decoded. Training may skip it (``on_error='skip'``); a wrong
    format (colour mask, unexpected ids, malformed list) is a plain :class:`DatasetError` and always raises,
    because it concerns the whole dataset and skipping would silently empty it."""


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as ``uint8[H, W, 3]`` RGB (grey/CMYK/palette images are converted).

    Raises :class:`DatasetError` naming ``path`` when the file is missing or not a decodable image.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"image file not found: '{path}'", path)
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise CorruptFileError(f"cannot decode image '{path}' ({type(e).__name__}: {e}); expected a JPEG/PNG "
                           "RGB photograph", path) from e
    return arr


def _voc_palette() -> np.ndarray:
    """The 256-colour PASCAL VOC palette (bit-interleaving construction): ``uint8[256, 3]``."""
    cmap = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


#: colour of class id ``i`` in VOC label PNGs: 0 background (0, 0, 0), 1 aeroplane (128, 0, 0), ...,
#: 8 cat (64, 0, 0), ..., 255 void/border (224, 224, 192)
VOC_PALETTE = _voc_palette()
_VOC_CODE_TO_ID = {int(r) << 16 | int(g) << 8 | int(b): i for i, (r, g, b) in enumerate(VOC_PALETTE)}


def rgb_mask_labels(rgb: np.ndarray, what: str = "mask") -> Tuple[np.ndarray, str]:
    """The one rule for colour (RGB) masks, shared by the datasets (:func:`read_label`) and by prediction
    (:func:`benchmarks.engine.inference.load_mask`). ``rgb``: ``uint8[H, W, 3]`` (or ``[H, W, 4]``: an alpha
    channel that varies is the mask, object = opaque (> 127); a constant one is dropped).

    1. every pixel a colour of the VOC palette (:data:`VOC_PALETTE`: black = 0 background, (128, 0, 0) = 1
       aeroplane, ..., (224, 224, 192) = 255 void): a label map of class ids (``kind='labels'``); an
       all-black mask is this case (all background);
    2. every pixel black (0, 0, 0) or white (255, 255, 255): a binary mask, object = non-black
       (``kind='binary'``, values 0/1);
    3. anything else (anti-aliased or JPEG edges, other colours): ``ValueError`` naming ``what`` and
       a colour found (the caller adds what to do).

    Returns ``(uint8[H, W], kind)`` with ``kind`` in ``'labels'``, ``'binary'`` (``'alpha'`` for an RGBA
    mask read from its alpha channel).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"{what}: expected a colour image of shape (H, W, 3), got {rgb.shape}")
    if rgb.shape[2] == 4:
        a = rgb[..., 3]
        if a.size and a.min() != a.max():
            return (a > 127).astype(np.uint8), "alpha"
        rgb = rgb[..., :3]
    rgb = rgb.astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours = np.unique(code)
    foreign = [int(c) for c in colours if int(c) not in _VOC_CODE_TO_ID]
    if not foreign:
        lut = np.array([_VOC_CODE_TO_ID[int(c)] for c in colours], dtype=np.uint8)
        return lut[np.searchsorted(colours, code)], "labels"
    if set(colours.tolist()) <= {0, 0xFFFFFF}:
        return (code != 0).astype(np.uint8), "binary"
    c = foreign[0]
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    raise ValueError(f"{what}: a colour mask with colour ({c >> 16}, {(c >> 8) & 255}, {c & 255}){more} that is "
                     f"neither black/white nor a VOC palette colour")


def read_label(path: PathLike, *, max_id: int, allow_ignore: bool = True, layout: str = "") -> np.ndarray:
    """Read a class-index mask PNG as ``uint8[H, W]`` (values ``0..max_id`` and optionally 255).

    Palette ('P') PNGs are read as their indices — never converted to RGB or luminance, which would
    give wrong class ids (PFENet issue #12). Single-channel 'L'/'I' masks are accepted as indices.
    Colour masks (RGB/RGBA) are read by the rule of :func:`rgb_mask_labels` (the one prediction uses):
    VOC palette colours are mapped back to their class ids; a black-and-white mask (no class ids) or
    any other colour is rejected with a message.

    Raises :class:`DatasetError` naming ``path`` for a missing/corrupt file, a colour mask that is not
    in VOC palette colours, or ids outside the expected range.
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"mask file not found: '{path}'", path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                arr = np.array(im)
            elif mode in ("RGB", "RGBA"):
                try:
                    arr, kind = rgb_mask_labels(np.array(im), f"mask '{path}'")
                except ValueError as e:
                    raise DatasetError(f"{e}; expected a class-index PNG (palette 'P' or grey 'L' whose pixel values "
                                       f"are class ids, or RGB in the VOC palette colours). {layout}".strip(),
                                       path) from None
                if kind != "labels":
                    raise DatasetError(
                        f"mask '{path}' is a {'black-and-white' if kind == 'binary' else 'transparency'} RGB "
                        f"image: it marks an object but no class id; expected a class-index PNG (palette 'P' or "
                        f"grey 'L' whose pixel values are class ids, or RGB in the VOC palette colours). "
                        f"{layout}".strip(), path)
            else:
                raise DatasetError(
                    f"mask '{path}' has PIL mode {mode!r}; expected a single-channel class-index PNG "
                    f"(palette 'P' or grey 'L' whose pixel values are class ids). {layout}".strip(), path)
    except DatasetError:
        raise
    except Exception as e:
        raise CorruptFileError(f"cannot decode mask '{path}' ({type(e).__name__}: {e}); expected a "
                           f"single-channel class-index PNG. {layout}".strip(), path) from e
    if arr.ndim != 2:
        raise DatasetError(f"mask '{path}' has shape {arr.shape}; expected a 2-D class-index image", path)
    arr_max = int(arr.max()) if arr.size else 0
    if arr.dtype != np.uint8:
        if arr.size and (int(arr.min()) < 0 or arr_max > 255):
            raise DatasetError(f"mask '{path}' has values outside 0..255; expected class ids 0..{max_id}"
                               + (" and 255 (ignore)" if allow_ignore else ""), path)
        arr = arr.astype(np.uint8)
    if arr_max > max_id:
        present = np.unique(arr)
        bad = [int(v) for v in present if v > max_id and not (allow_ignore and v == 255)]
        if bad:
            raise DatasetError(
                f"mask '{path}' contains unexpected ids {bad[:10]}; expected class ids 0..{max_id}"
                + (" and 255 (ignore/void)" if allow_ignore else "") + f". {layout}".rstrip(". ") + ".", path)
    return arr


def check_root(root: PathLike, what: str, expected_layout: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{what}: data root '{root}' is not a directory. Expected layout:\n{expected_layout}", root)
    return root


# ----------------------------------------------------------------------------------------------
# list files
# ----------------------------------------------------------------------------------------------

_PAIR_RE = re.compile(r"^(?P<stem>.+)__(?P<cls>\d+)$")


def read_list_lines(path: PathLike) -> List[Tuple[int, str]]:
    """Non-empty, stripped lines of a text list with their 1-based line numbers."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"list file not found: '{path}'", path)
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise DatasetError(f"list file '{path}' is not a text file ({e})", path) from e
    return [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]


def parse_list(path: PathLike, fmt: str = "auto") -> Tuple[str, list]:
    """Parse a PFENet image/label list or an HSNet per-pair split file.

    Returns ``("pfenet", [(line_no, image_rel, label_rel), ...])`` or
    ``("hsnet", [(line_no, stem, class_id), ...])``.
    PFENet lines: ``JPEGImages/<id>.jpg SegmentationClassAug/<id>.png``; HSNet lines: ``<id>__<cc>``
    (1-based 2-digit class). Raises :class:`DatasetError` naming the file and line on a malformed line.
    """
    lines = read_list_lines(path)
    if not lines:
        raise DatasetError(f"list file '{path}' is empty", path)
    if fmt == "auto":
        first = lines[0][1].split()
        if len(first) == 2:
            fmt = "pfenet"
        elif len(first) == 1 and _PAIR_RE.match(first[0]):
            fmt = "hsnet"
        else:
            raise DatasetError(
                f"cannot tell the format of list '{path}' from line {lines[0][0]}: {lines[0][1]!r}; expected "
                "PFENet lines 'JPEGImages/<id>.jpg SegmentationClassAug/<id>.png' or HSNet lines '<id>__<cc>'",
                path)
    out = []
    for n, ln in lines:
        toks = ln.split()
        if fmt == "pfenet":
            if len(toks) != 2:
                raise DatasetError(f"{path}:{n}: expected 'image_path label_path', got {ln!r}", path)
            out.append((n, toks[0], toks[1]))
        elif fmt == "hsnet":
            m = _PAIR_RE.match(toks[0]) if len(toks) == 1 else None
            if not m:
                raise DatasetError(f"{path}:{n}: expected '<image id>__<class>' (e.g. 2007_000033__01), got {ln!r}",
                                   path)
            out.append((n, m.group("stem"), int(m.group("cls"))))
        else:
            raise ValueError(f"list_format: expected 'auto', 'pfenet' or 'hsnet', got {fmt!r}")
    return fmt, out


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------

def resolve_cache_dir(cache_dir) -> Optional[Path]:
    """``cache_dir`` argument -> directory (``False`` disables caching).

    ``None`` means ``$DCM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/dcm`` or ``~/.cache/dcm``.
    """
    if cache_dir is False:
        return None
    if cache_dir is None:
        env = os.environ.get("DCM_CACHE_DIR")
        if env:
            return Path(env).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "dcm"
    return Path(cache_dir).expanduser()


def fingerprint(parts: Iterable) -> str:
    h = hashlib.sha256()
    h.update(f"dcm-cache-v{CACHE_VERSION}".encode())
    for p in parts:
        h.update(b"\x00")
        h.update(str(p).encode())
    return h.hexdigest()


def file_stamp(path: Path) -> str:
    try:
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


class PoolCache:
    """A small JSON cache of per-image class pixel counts, written atomically.

    The key hashes everything the counts depend on (the ordered label paths with their size and
    mtime, the dataset kind and the cache version), so an edited list or mask is rescanned.
    """

    def __init__(self, cache_dir: Optional[Path], kind: str, key: str):
        self.path = None if cache_dir is None else Path(cache_dir) / f"{kind}-{key[:24]}.json"
        self.key = key

    def load(self):
        if self.path is None or not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable cache file %s (%s)", self.path, e)
            return None
        if data.get("key") != self.key:
            return None
        return data.get("payload")

    def save(self, payload) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=str(self.path.parent))
            with os.fdopen(fd, "w") as f:
                json.dump({"key": self.key, "payload": payload}, f)
            os.replace(tmp, self.path)  # atomic on POSIX and Windows
        except OSError as e:  # a read-only cache location must not break the dataset
            log.warning("could not write cache file %s (%s); continuing without cache", self.path, e)
            try:
                os.unlink(tmp)  # type: ignore[possibly-undefined]
            except Exception:
                pass


def class_counts(label: np.ndarray, max_id: int) -> dict:
    """``{class_id: pixel_count}`` for ids ``1..max_id`` present in ``label`` (0 and 255 excluded).

    Example:
        >>> class_counts(np.array([[0, 1, 1], [255, 3, 1]], dtype=np.uint8), 20)
        {1: 3, 3: 1}
    """
    bc = np.bincount(label.ravel(), minlength=256)
    return {int(c): int(bc[c]) for c in np.flatnonzero(bc[1:max_id + 1]) + 1}
