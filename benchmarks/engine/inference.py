"""Segment your own images from a few annotated examples: :func:`predict` and the pictures around it.

``predict(model, query_img, [(support_img, support_mask_or_box), ...])`` letterboxes every image to
``size × size`` exactly like the benchmark's test transform (docs/PROTOCOLS.md#test-resizing), runs the network (K shots at
once, or 1-shot per support with a Table 7 fusion), crops the letterboxed content out of the output and
resizes it back to the query's own size. Images and masks may be file paths, PIL images or numpy
arrays; a support "mask" may also be a box ``(x0, y0, x1, y1)`` in pixels (the paper's Table A2 uses
boxes instead of masks).

Mask files (:func:`load_mask`), one rule for every mode (palette, grey, colour, numpy):

0. a colour (RGB) mask is first read by the rule the datasets use too
   (:func:`benchmarks.datasets._io.rgb_mask_labels`, docs/DATA.md#colour-masks): only black and white
   pixels -> a binary mask, object = non-black; only VOC palette colours (black = background,
   (128, 0, 0) = 1 aeroplane, ..., (64, 0, 0) = 8 cat, ..., (224, 224, 192) = 255 void) -> the class-id
   label map they encode, then read by rules 1-4 like the palette PNG it came from; any other colour
   (anti-aliased or JPEG edges, a drawing in another colour) -> an error naming the file. An RGBA
   mask whose alpha varies is read from its alpha (opaque = object);
1. with ``class_id`` the mask is a label map: ``class_id`` is the object, 255 stays "ignore";
2. values in ``{0, 1}`` or ``{0, 1, 255}``: a label (1 = object, 255 = ignore);
3. a label map of class ids -- one channel, every value other than 0 and 255 below 128, at most 32 of
   them (VOC/SBD ``SegmentationClass*`` PNGs, palette, grey or VOC-coloured RGB): with exactly one class
   present that class is the object (255 = ignore) and a warning says so; with several, an error asks
   for ``class_id`` (``--class-id``);
4. a mask that is 255 everywhere (all "ignore" or all "object"?) is an error;
5. anything else one-channel (grey or anti-aliased PNGs): brighter than 127 = object.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Prediction", "predict", "load_image", "load_mask", "load_support", "box_mask", "extra_maps", "overlay",
           "heatmap", "figure", "PredictInputError"]

ImageLike = Union[str, os.PathLike, np.ndarray, "PIL.Image.Image"]  # noqa: F821
Box = Tuple[float, float, float, float]


class PredictInputError(ValueError):
    """A user input (file, mask, box) is missing or malformed; the message names it."""


@dataclass
class Prediction:
    """Output of :func:`predict`, all at the query's original ``H0 × W0``.

    Attributes:
        mask: ``uint8[H0, W0]`` in {0, 1}.
        prob: ``float32[H0, W0]`` foreground probability.
        extras: named ``float32[H0, W0]`` maps in [0, 1] when the network gives them: DPCN's
            ``activation_map_<i>`` (SAM, one per window), ``initial_pseudo_mask`` (M⁰),
            ``refined_pseudo_mask`` (Mʳ); PFENet's ``prior_mask``.
    """

    mask: np.ndarray
    prob: np.ndarray
    extras: Dict[str, np.ndarray] = field(default_factory=dict)


# =============================================================================== reading inputs
def _name(x) -> str:
    return str(x) if isinstance(x, (str, os.PathLike)) else f"<{type(x).__name__}>"


def _open(x, what: str):
    from PIL import Image
    if isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if not p.is_file():
            raise PredictInputError(f"{what} '{p}' not found")
        try:
            img = Image.open(p)
            img.load()
        except Exception as e:
            raise PredictInputError(f"{what} '{p}' is not a readable image: {e}") from None
        return img
    return x


def load_image(x: ImageLike, what: str = "image") -> np.ndarray:
    """RGB ``uint8[H, W, 3]`` from a path, a PIL image or an array (grey ``[H, W]`` is expanded)."""
    from PIL import Image
    x = _open(x, what)
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB")).copy()
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise PredictInputError(f"{what}: expected a file path, a PIL image or a numpy array, got {type(x).__name__}")
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    if x.ndim != 3 or x.shape[2] not in (3, 4):
        raise PredictInputError(f"{what}: expected an array of shape (H, W, 3), got {x.shape}")
    x = x[..., :3]
    if x.dtype != np.uint8:
        x = np.clip(x * (255.0 if x.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def _colour_mask(rgb: np.ndarray, what: str) -> Tuple[np.ndarray, bool]:
    """An RGB(A) mask by the shared colour rule: ``(2-D array, is a label map of class ids)``."""
    from ..datasets._io import rgb_mask_labels
    try:
        arr, kind = rgb_mask_labels(rgb, what)
    except ValueError as e:
        raise PredictInputError(f"{e}; save it as a black-and-white mask (object white), or as a palette/grey PNG "
                                f"of class ids (with --class-id)") from None
    return arr, kind == "labels"


def load_mask(x: ImageLike, *, class_id: Optional[int] = None, what: str = "mask") -> np.ndarray:
    """A support mask as a label ``uint8[H, W]`` in {0, 1, 255} (see the module docstring for the rules)."""
    from PIL import Image
    if what == "mask" and isinstance(x, (str, os.PathLike)):
        what = f"mask '{x}'"  # the messages name the file
    x = _open(x, what)
    palette = False
    single_channel = False
    if isinstance(x, Image.Image):
        palette = x.mode == "P"
        single_channel = x.mode in ("P", "L", "I", "I;16")
        if x.mode in ("P", "L", "1", "I", "I;16", "F"):
            arr = np.asarray(x if x.mode != "1" else x.convert("L"))
        elif x.mode == "LA":
            a = np.asarray(x.getchannel("A"))
            single_channel = a.min() == a.max()
            arr = np.where(a > 127, 1, 0) if not single_channel else np.asarray(x.getchannel("L"))
        else:
            arr, palette = _colour_mask(np.asarray(x.convert("RGBA" if "A" in x.mode else "RGB")), what)
    else:
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        single_channel = arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer)
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            if not np.issubdtype(arr.dtype, np.integer):  # float colours in [0, 1] or [0, 255]
                arr = np.rint(np.clip(arr * (255.0 if arr.max(initial=0) <= 1.0 else 1.0), 0, 255))
            arr, palette = _colour_mask(arr.astype(np.uint8), what)
    if arr.ndim != 2:
        raise PredictInputError(f"{what}: expected a 2-D mask (H, W), got shape {arr.shape}")
    if arr.dtype == bool or (np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0):
        arr = (arr > 0.5).astype(np.int64)  # boolean or soft [0, 1] masks
    arr = arr.astype(np.int64)
    vals = set(np.unique(arr).tolist())
    if class_id is not None:
        out = np.where(arr == class_id, 1, 0)
        out[arr == 255] = 255
        if class_id not in vals:
            warnings.warn(f"{what}: class {class_id} does not occur (values {sorted(vals)[:10]})", RuntimeWarning)
        return out.astype(np.uint8)
    if vals == {255}:
        raise PredictInputError(f"{what}: every pixel is 255 -- is that 'ignore' (a label map) or 'object' "
                                f"(a white mask)? Give a mask with 0 as background, or a label map with --class-id")
    ids = sorted(vals - {0, 255})
    if (vals <= {0, 1, 255} and 1 in vals) or vals <= {0, 1}:  # label convention (or boolean)
        out = arr
    elif ids and (single_channel or palette) and max(ids) < 128 and len(ids) <= 32:  # a label map of class ids
        if len(ids) > 1:
            raise PredictInputError(f"{what}: a label map with classes {ids}; pass --class-id N (class_id=N) "
                                    f"to say which one is the object")
        warnings.warn(f"{what}: read as a label map: class {ids[0]} is the object, 255 is ignored "
                      f"(pass --class-id to choose another class)", RuntimeWarning)
        out = np.where(arr == ids[0], 1, 0)
        out[arr == 255] = 255
    else:  # grey / black-and-white / colour drawing: bright = object
        out = np.where(arr > 127, 1, 0)
    return out.astype(np.uint8)


def box_mask(box: Sequence[float], shape: Tuple[int, int], what: str = "box") -> np.ndarray:
    """``uint8[H, W]`` with 1 inside the box ``(x0, y0, x1, y1)`` (pixels, x1/y1 exclusive), 0 outside.

    Example:
        >>> box_mask((1, 0, 3, 2), (3, 4)).tolist()
        [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise PredictInputError(f"{what}: expected four numbers x0,y0,x1,y1, got {box!r}") from None
    h, w = shape
    if not (x1 > x0 and y1 > y0):
        raise PredictInputError(f"{what}: expected x0 < x1 and y0 < y1, got {box!r}")
    xa, xb = max(0, int(math.floor(x0))), min(w, int(math.ceil(x1)))
    ya, yb = max(0, int(math.floor(y0))), min(h, int(math.ceil(y1)))
    if xb <= xa or yb <= ya:
        raise PredictInputError(f"{what}: {box!r} lies outside the {w}x{h} (WxH) image")
    m = np.zeros((h, w), dtype=np.uint8)
    m[ya:yb, xa:xb] = 1
    return m


def load_support(item, i: int, class_id: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Support ``i`` (0-based, for the messages) of :func:`predict`, ``(image, mask)`` or ``(image, box)``, read as
    ``(uint8[H, W, 3] image, mask)`` by :func:`load_image` and :func:`load_mask` / :func:`box_mask`."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise PredictInputError(f"supports[{i}]: expected (image, mask) or (image, (x0, y0, x1, y1)), got {type(item).__name__}")
    im_src, m_src = item
    img = load_image(im_src, f"support image {i + 1} ({_name(im_src)})")
    is_box = isinstance(m_src, (tuple, list)) and len(m_src) == 4 and all(isinstance(v, (int, float)) for v in m_src)
    if is_box:
        return img, box_mask(m_src, img.shape[:2], f"support box {i + 1}")
    mask = load_mask(m_src, class_id=class_id, what=f"support mask {i + 1} ({_name(m_src)})")
    if mask.shape != img.shape[:2]:
        raise PredictInputError(
            f"support mask {i + 1} ({_name(m_src)}) is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
            f"({_name(im_src)}) is {img.shape[1]}x{img.shape[0]}; a mask must have its image's size")
    if not (mask == 1).any():
        warnings.warn(f"support mask {i + 1} ({_name(m_src)}) has no foreground pixel; the network falls back to "
                      f"the whole support image", RuntimeWarning)
    return img, mask


# =============================================================================== the prediction
def _to_original(x: torch.Tensor, content: Tuple[int, int], orig: Tuple[int, int]) -> torch.Tensor:
    """``[1, C, S, S]`` map on the letterbox canvas → ``[1, C, H0, W0]`` (crop the content, resize back)."""
    nh, nw = content
    x = x[..., :nh, :nw]
    return F.interpolate(x, size=orig, mode="bilinear", align_corners=False)


def _canvas(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=True)


@torch.no_grad()
def predict(model: nn.Module, query_img: ImageLike, supports: Sequence[Tuple[ImageLike, object]], *,
            size: int = 473, scales: Optional[Sequence[int]] = None, fusion: str = "native",
            class_id: Optional[int] = None, device=None, amp="auto") -> Prediction:
    """Segment in ``query_img`` the object shown in the ``supports``.

    Args:
        model: a network of the registry (e.g. from :func:`benchmarks.engine.load_checkpoint_model`).
        query_img: path, PIL image or ``uint8[H, W, 3]``.
        supports: ``[(image, mask), ...]`` where ``mask`` is a path/PIL/array (see :func:`load_mask`) or a
            box ``(x0, y0, x1, y1)``.
        size: letterbox size of the network input (473 for the paper's models; a model trained on the
            synthetic set wants its image size, 96).
        scales: several input sizes for multi-scale testing (probabilities averaged); default ``[size]``.
        fusion: K-shot strategy: ``native`` (all supports at once) or ``vote`` / ``average`` / ``or``
            (1-shot per support, masks fused; paper Table 7).
        class_id: read label-map masks as ``mask == class_id``.
        device: default: the model's device.
        amp: autocast setting (``auto`` = bf16 on CUDA).

    Returns:
        :class:`Prediction` at the query's original size.
    """
    from ..datasets.transforms import letterbox_shape, test_transform
    from .device import amp_context
    from .distributed import unwrap
    from .fusion import _fuse

    if fusion not in ("native", "vote", "average", "or"):
        raise PredictInputError(f"fusion: expected native, vote, average or or, got {fusion!r}")
    if not supports:
        raise PredictInputError("supports: at least one (image, mask) pair is needed")
    net = unwrap(model)
    was_training = net.training
    net.eval()
    device = torch.device(device) if device is not None else next(net.parameters()).device
    q = load_image(query_img, f"query image ({_name(query_img)})")
    pairs = [load_support(item, i, class_id) for i, item in enumerate(supports)]
    h0, w0 = q.shape[:2]
    sizes = [int(s) for s in (scales or [size])]
    prob_sum = None
    extras_sum: Dict[str, torch.Tensor] = {}
    try:
        for S in sizes:
            tf = test_transform(S, "letterbox")
            qi, _ = tf(q, np.zeros((h0, w0), np.uint8))
            s_imgs, s_masks = zip(*(tf(im, m) for im, m in pairs))
            qt = qi[None].to(device)
            st = torch.stack(s_imgs)[None].to(device)
            smt = torch.stack(s_masks)[None].to(device)
            content = letterbox_shape(h0, w0, S)

            def run(s, sm):
                with amp_context(device, amp):
                    return net(qt, s, sm)

            if fusion == "native" or st.shape[1] == 1:
                out = run(st, smt)
                fg = torch.softmax(out["logits"].float(), 1)[:, 1:]
                outs = [out]
            else:
                outs = [run(st[:, k:k + 1], smt[:, k:k + 1]) for k in range(st.shape[1])]
                probs = torch.stack([torch.softmax(o["logits"].float(), 1)[:, 1] for o in outs])
                fg = _fuse(probs, fusion)[:, None]
            p = _to_original(_canvas(fg, S), content, (h0, w0)).clamp(0, 1)
            prob_sum = p if prob_sum is None else prob_sum + p
            for name, t in extra_maps(outs).items():
                e = _to_original(_canvas(t, S), content, (h0, w0))
                extras_sum[name] = e if name not in extras_sum else extras_sum[name] + e
    finally:
        net.train(was_training)
    prob = (prob_sum / len(sizes))[0, 0].cpu().numpy().astype(np.float32)
    extras = {k: (v / len(sizes))[0, 0].clamp(0, 1).cpu().numpy().astype(np.float32) for k, v in extras_sum.items()}
    return Prediction(mask=(prob > 0.5).astype(np.uint8), prob=prob, extras=extras)


def extra_maps(outs: List[dict]) -> Dict[str, torch.Tensor]:
    """The named maps of :attr:`Prediction.extras` from the network outputs ``outs`` (one per 1-shot run, or
    one K-shot output): ``{name: [B, 1, h, w]}``, averaged over the outputs."""
    got: Dict[str, List[torch.Tensor]] = {}
    for o in outs:
        maps = o.get("activation_maps")
        if isinstance(maps, torch.Tensor):
            for i in range(maps.shape[1]):
                got.setdefault(f"activation_map_{i + 1}", []).append(maps[:, i:i + 1].float())
        for k in ("initial_pseudo_mask", "refined_pseudo_mask", "prior_mask"):
            if isinstance(o.get(k), torch.Tensor):
                got.setdefault(k, []).append(o[k].float())
    return {k: torch.stack(v).mean(0) for k, v in got.items()}


# =============================================================================== pictures (PIL only)
_JET = np.array([[0, 0, 128], [0, 0, 255], [0, 128, 255], [0, 255, 255], [128, 255, 128], [255, 255, 0],
                 [255, 128, 0], [255, 0, 0], [128, 0, 0]], dtype=np.float32)


def heatmap(values: np.ndarray) -> "PIL.Image.Image":  # noqa: F821
    """A ``[H, W]`` map in [0, 1] as a jet-coloured RGB image."""
    from PIL import Image
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0, 1) * (len(_JET) - 1)
    lo = np.floor(v).astype(np.int64)
    hi = np.minimum(lo + 1, len(_JET) - 1)
    t = (v - lo)[..., None]
    rgb = _JET[lo] * (1 - t) + _JET[hi] * t
    return Image.fromarray(rgb.astype(np.uint8))


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 40, 40), alpha: float = 0.5) -> "PIL.Image.Image":  # noqa: F821
    """The image with ``mask == 1`` tinted (and ``255`` hatched grey), as a PIL image."""
    from PIL import Image
    img = image.astype(np.float32).copy()
    fg = mask == 1
    img[fg] = img[fg] * (1 - alpha) + np.asarray(color, np.float32) * alpha
    img[mask == 255] = img[mask == 255] * 0.5 + 64
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def figure(query: np.ndarray, supports: Sequence[Tuple[np.ndarray, np.ndarray]], pred: Prediction,
           tile: int = 224) -> "PIL.Image.Image":  # noqa: F821
    """A grid: supports with their masks, the query, its prediction; then every extra map as a heatmap."""
    from PIL import Image, ImageDraw
    top = [(f"support {i + 1}", overlay(im, m, color=(40, 200, 40))) for i, (im, m) in enumerate(supports)]
    top += [("query", Image.fromarray(query)), ("prediction", overlay(query, pred.mask)),
            ("fg probability", heatmap(pred.prob))]
    bottom = [(k.replace("_", " "), heatmap(v)) for k, v in pred.extras.items()]
    cols = max(len(top), len(bottom), 1)
    rows = [top] + ([bottom] if bottom else [])
    lab = 18
    canvas = Image.new("RGB", (cols * tile, len(rows) * (tile + lab)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, (title, im) in enumerate(row):
            w, h = im.size
            s = tile / max(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
            x, y = c * tile, r * (tile + lab)
            canvas.paste(im, (x + (tile - im.size[0]) // 2, y + lab + (tile - im.size[1]) // 2))
            draw.text((x + 4, y + 3), title, fill=(0, 0, 0))
    return canvas
