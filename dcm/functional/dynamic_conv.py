"""Dynamic depthwise convolution with per-sample kernels (DPCN Eq. 8) and the DCM kernel pipeline."""
from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _check, config
from .._compat import renamed_kwarg
from .foreground import _foreground_pool

__all__ = [
    "dynamic_depthwise_conv2d",
    "dynamic_depthwise_conv2d_multi",
    "generate_dynamic_kernels",
    "dynamic_convolution",
    "normalize_kernel",
]


#: lower bound of the kernel norm in :func:`normalize_kernel` (a zero kernel stays zero)
KERNEL_NORM_EPS = 1e-12
#: the values of ``kernel_norm``
KERNEL_NORMS = (None, "l1", "l2")


# ------------------------------------------------------------------------------------------- checks
def _kernel_size(name: str, kernel_size) -> int:
    """An odd ``S``: an int or a pair of equal ints."""
    S = _check.odd_size(name, kernel_size)[0]
    if isinstance(kernel_size, (tuple, list)) and len(set(kernel_size)) != 1:
        raise ValueError(f"{name}: expected a single odd int S, got {kernel_size!r}")
    return S


def _variants(name: str, variants) -> Tuple[str, ...]:
    """A non-empty subset of ``("v", "h", "s")``, in the caller's order -> tuple."""
    variants = tuple(variants)
    if not variants or any(v not in ("v", "h", "s") for v in variants) or len(set(variants)) != len(variants):
        raise ValueError(f"{name}: expected a non-empty subset of ('v', 'h', 's'), got {variants!r}")
    return variants


def _square_source(name: str, square_source) -> str:
    return _check.one_of(name, square_source, ("serial", "parallel"))


def _kernel_norm(name: str, kernel_norm) -> Optional[str]:
    return _check.one_of(name, kernel_norm, KERNEL_NORMS)


def _options(kernel_size, variants, square_source, fg_threshold, kernel_norm) -> tuple:
    """The checked ``(S, variants, square_source, fg_threshold, kernel_norm)`` of the kernel generator."""
    return (_kernel_size("kernel_size", kernel_size), _variants("variants", variants), _square_source("square_source", square_source),
            _check.fg_threshold("fg_threshold", fg_threshold), _kernel_norm("kernel_norm", kernel_norm))


def _check_weight(name: str, weight, x: torch.Tensor) -> None:
    """Kernels ``Tensor[B, C, kh, kw]`` (odd sizes) for a checked ``x[B, C, H, W]``."""
    _check.tensor(name, weight)
    _check.rank(name, weight, (4,), "(B, C, kh, kw)")
    B, C = x.shape[:2]
    if weight.shape[0] != B or weight.shape[1] != C:
        raise ValueError(f"{name}: expected shape (B={B}, C={C}, kh, kw), got ({', '.join(map(str, weight.shape))})")
    _check.same_device(name, weight, "x", x)
    _check.odd_size(f"{name} kernel size", (int(weight.shape[2]), int(weight.shape[3])))


def _grouped(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    kh, kw = weight.shape[-2:]
    if B == 0:
        return x.new_zeros(x.shape)
    out = F.conv2d(
        x.reshape(1, B * C, H, W),
        weight.reshape(B * C, 1, kh, kw),
        padding=(kh // 2, kw // 2),
        groups=B * C,
    )
    return out.reshape(B, C, H, W)


def dynamic_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    r"""Depthwise convolution of each sample with its own kernels, "same" padding, stride 1, no bias.

    ``out[b, c] = conv2d(x[b, c], weight[b, c])`` (cross-correlation, as ``F.conv2d``), computed by
    folding the batch into the channels and running one grouped convolution with ``groups = B·C``.

    Args:
        x: ``Tensor[B, C, H, W]``, any memory format.
        weight: ``Tensor[B, C, kh, kw]`` with odd ``kh``, ``kw``, same dtype and device as ``x``.

    Returns:
        ``Tensor[B, C, H, W]``.

    Example:
        >>> x = torch.arange(9.).reshape(1, 1, 3, 3)
        >>> w = torch.zeros(1, 1, 3, 1); w[0, 0, 1, 0] = 1.0   # a delta kernel is the identity
        >>> torch.equal(dynamic_depthwise_conv2d(x, w), x)
        True
    """
    x = _check.query("x", x)
    _check_weight("weight", weight, x)
    return _grouped(x, weight)


def dynamic_depthwise_conv2d_multi(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    r"""Several dynamic depthwise convolutions of the same input, one output per kernel set.

    Equal to ``tuple(dynamic_depthwise_conv2d(x, w) for w in weights)``; on CUDA with the Triton
    backend all kernels are applied in one fused pass that reads ``x`` once.

    Args:
        x: ``Tensor[B, C, H, W]``.
        weights: kernels ``Tensor[B, C, kh_i, kw_i]`` (odd sizes, may differ per entry).

    Example:
        >>> x = torch.randn(2, 3, 5, 6)
        >>> ws = [torch.randn(2, 3, 5, 1), torch.randn(2, 3, 1, 5)]
        >>> [o.shape for o in dynamic_depthwise_conv2d_multi(x, ws)]
        [torch.Size([2, 3, 5, 6]), torch.Size([2, 3, 5, 6])]
    """
    x, weights = _check.query("x", x), list(weights)
    for i, w in enumerate(weights):
        _check_weight(f"weights[{i}]", w, x)
    return _dynamic_depthwise_conv2d_multi(x, weights)


def _dynamic_depthwise_conv2d_multi(x: torch.Tensor, weights: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """:func:`dynamic_depthwise_conv2d_multi` on checked inputs."""
    if config.resolve_backend(x, "dynamic_conv") == "triton":
        from ..kernels import dynamic_conv as _k

        if _k.supported(x, weights):
            return _k.dynamic_depthwise_conv2d_multi(x, weights)
    return tuple(_grouped(x, w) for w in weights)


KernelNet = Callable[[torch.Tensor], torch.Tensor]


@renamed_kwarg("threshold", "fg_threshold")
def generate_dynamic_kernels(
    support: torch.Tensor,
    support_mask: torch.Tensor,
    generators: Mapping[str, KernelNet],
    kernel_size: int = 5,
    variants: Sequence[str] = ("v", "h", "s"),
    square_source: str = "serial",
    fg_threshold: float = 0.5,
    kernel_norm: Optional[str] = None,
) -> dict:
    r"""The DCM kernel generator (DPCN Eq. 5–7, 11): support foreground -> per-sample kernels.

    1. Foreground vectors of all shots, raster order, concatenated (:func:`foreground_pool`).
    2. ``p_s`` = pooled to ``S`` bins; ``ker_v = g_v(p_s)`` (``S×1``), ``ker_h = g_h(p_s)`` (``1×S``).
    3. Square kernel ``S×S`` (row-major from ``S²`` values): ``square_source="serial"`` (default,
       paper Table A1 "5→25"): ``g_s`` applied to the ``2S`` vectors ``[ker_v, ker_h]`` adaptively
       pooled to ``S²``; ``"parallel"`` ("5/25"): ``g_s`` applied to the foreground pooled to ``S²``.
    4. Optional kernel normalisation (``kernel_norm``, not in the paper), per sample and channel over
       the taps of each kernel: ``"l1"``: ``k / max(Σ|k|, eps)``, ``"l2"``: ``k / max(‖k‖₂, eps)``
       (:data:`KERNEL_NORM_EPS`). With ``"l1"`` a dynamic-conv output is bounded by the largest
       absolute input value of its window and homogeneous of degree 1 in the feature scale (the raw
       kernels make it grow with the square of the scale and with the number of taps).

    Args:
        support: ``Tensor[B, K, C, H, W]`` or ``Tensor[B, C, H, W]``.
        support_mask: ``Tensor[B, K, h, w]`` or ``Tensor[B, h, w]``.
        generators: ``{"v": g_v, "h": g_h, "s": g_s}``, callables ``Tensor[B, C, L] -> Tensor[B, C, L]``
            (the entries needed by ``variants`` and ``square_source``).
        kernel_size: odd ``S``.
        variants: subset of ``("v", "h", "s")``.
        square_source: ``"serial"`` or ``"parallel"``.
        fg_threshold: foreground threshold (:func:`dcm.functional.foreground_selection`).
        kernel_norm: ``None`` (the paper: raw generated kernels), ``"l1"`` or ``"l2"`` (step 4).

    Returns:
        ``{"v": Tensor[B, C, S, 1], "h": Tensor[B, C, 1, S], "s": Tensor[B, C, S, S]}`` restricted to
        ``variants``.

    Example:
        >>> g = {k: (lambda t: t) for k in "vhs"}
        >>> ks = generate_dynamic_kernels(torch.randn(2, 4, 6, 6), torch.ones(2, 6, 6), g, kernel_size=3)
        >>> {k: tuple(v.shape) for k, v in ks.items()}
        {'v': (2, 4, 3, 1), 'h': (2, 4, 1, 3), 's': (2, 4, 3, 3)}
    """
    support, support_mask = _check.support_and_mask("support", support, "support_mask", support_mask)
    return _generate_dynamic_kernels(support, support_mask, generators, *_options(kernel_size, variants, square_source, fg_threshold,
                                                                                  kernel_norm))


def _generate_dynamic_kernels(
    support: torch.Tensor,
    support_mask: torch.Tensor,
    generators: Mapping[str, KernelNet],
    S: int,
    variants: Tuple[str, ...],
    square_source: str,
    fg_threshold: float,
    kernel_norm: Optional[str],
) -> dict:
    """:func:`generate_dynamic_kernels` on checked ``support[B, K, C, H, W]``, ``support_mask[B, K, h, w]``
    and options (:func:`_options`)."""
    need_asym = any(v in variants for v in "vh") or ("s" in variants and square_source == "serial")
    bins = ((S,) if need_asym else ()) + ((S * S,) if "s" in variants and square_source == "parallel" else ())
    pooled = dict(zip(bins, _foreground_pool(support, support_mask, bins, fg_threshold)))
    B, C = pooled[bins[0]].shape[:2]
    out = {}
    serial_s = "s" in variants and square_source == "serial"
    if "v" in variants or serial_s:
        kv = generators["v"](pooled[S])
        out["v"] = kv.reshape(B, C, S, 1)
    if "h" in variants or serial_s:
        kh = generators["h"](pooled[S])
        out["h"] = kh.reshape(B, C, 1, S)
    if "s" in variants:
        if square_source == "serial":
            src = F.adaptive_avg_pool1d(torch.cat([kv, kh], dim=2), S * S)
        else:
            src = pooled[S * S]
        out["s"] = generators["s"](src).reshape(B, C, S, S)
    return {v: _normalize_kernel(out[v], kernel_norm) for v in variants}


def normalize_kernel(weight: torch.Tensor, kernel_norm: Optional[str]) -> torch.Tensor:
    """Per-(sample, channel) normalisation of dynamic kernels ``Tensor[B, C, kh, kw]`` over their taps.

    ``None``: unchanged; ``"l1"``: ``w / max(Σ|w|, eps)``; ``"l2"``: ``w / max(‖w‖₂, eps)``.

    Example:
        >>> w = torch.tensor([[[[1.0], [-3.0]]]])
        >>> normalize_kernel(w, "l1").flatten().tolist()
        [0.25, -0.75]
    """
    return _normalize_kernel(weight, _kernel_norm("kernel_norm", kernel_norm))


def _normalize_kernel(weight: torch.Tensor, kernel_norm: Optional[str]) -> torch.Tensor:
    """:func:`normalize_kernel` with a checked ``kernel_norm``."""
    if kernel_norm is None:
        return weight
    p = 1 if kernel_norm == "l1" else 2
    norm = torch.linalg.vector_norm(weight, ord=p, dim=(-2, -1), keepdim=True)
    return weight / norm.clamp_min(KERNEL_NORM_EPS)


@renamed_kwarg("threshold", "fg_threshold")
def dynamic_convolution(
    query: torch.Tensor,
    support: torch.Tensor,
    support_mask: torch.Tensor,
    generators: Mapping[str, KernelNet],
    kernel_size: int = 5,
    variants: Sequence[str] = ("v", "h", "s"),
    square_source: str = "serial",
    fg_threshold: float = 0.5,
    kernel_norm: Optional[str] = None,
) -> Tuple[torch.Tensor, ...]:
    r"""Functional twin of :class:`dcm.DynamicConvModule`: kernels from the support, convolved over the query.

    Args:
        query: ``Tensor[B, C, H, W]`` (the filtered query feature in DPCN).
        support, support_mask, generators, kernel_size, variants, square_source, fg_threshold,
            kernel_norm: as :func:`generate_dynamic_kernels`.

    Returns:
        one ``Tensor[B, C, H, W]`` per variant, in the order of ``variants``.

    Example:
        >>> g = {k: (lambda t: t) for k in "vhs"}
        >>> outs = dynamic_convolution(torch.randn(2, 4, 7, 5), torch.randn(2, 4, 6, 6), torch.ones(2, 6, 6), g)
        >>> len(outs), tuple(outs[0].shape)
        (3, (2, 4, 7, 5))
    """
    query, support, support_mask = _check.episode(query, support, support_mask)
    return _dynamic_convolution(query, support, support_mask, generators,
                                *_options(kernel_size, variants, square_source, fg_threshold, kernel_norm))


def _dynamic_convolution(query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor, generators: Mapping[str, KernelNet],
                         *options) -> Tuple[torch.Tensor, ...]:
    """:func:`dynamic_convolution` on checked inputs (:func:`dcm._check.episode`) and options (:func:`_options`)."""
    kernels = _generate_dynamic_kernels(support, support_mask, generators, *options)
    return _dynamic_depthwise_conv2d_multi(query, [kernels[v].to(query.dtype) for v in kernels])
