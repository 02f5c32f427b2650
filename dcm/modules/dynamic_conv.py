"""DynamicConvModule: kernels generated from the support foreground, convolved over the query (DPCN §3.5)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import _check
from ..functional.dynamic_conv import _dynamic_convolution, _generate_dynamic_kernels, _kernel_norm, _square_source, _variants

__all__ = ["KernelGenerator", "DynamicConvModule"]


class KernelGenerator(nn.Sequential):
    """Two 1-D convolutions over a prototype sequence ``Tensor[B, C, L] -> Tensor[B, C, L]``.

    ``Conv1d(C, C, k, padding=k//2) -> ReLU -> Conv1d(C, C, k, padding=k//2)``: the paper's "two
    consecutive 1D convolution layers", with the feature channels as channels and the prototype index
    as length (docs/CONVENTIONS.md#kernel-generator).

    Example:
        >>> KernelGenerator(8)(torch.randn(2, 8, 5)).shape
        torch.Size([2, 8, 5])
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        k = _check.odd_size("kgen_kernel_size", kernel_size)[0]
        fk = {"device": device, "dtype": dtype}
        super().__init__(
            nn.Conv1d(channels, channels, k, padding=k // 2, **fk),
            nn.ReLU(inplace=True),
            nn.Conv1d(channels, channels, k, padding=k // 2, **fk),
        )


class DynamicConvModule(nn.Module):
    r"""Dynamic Convolution Module (DCM) of DPCN.

    The support foreground vectors (all shots, raster order) are pooled to ``S`` and ``S²``
    prototypes, three unshared kernel generators turn them into per-sample, per-channel kernels
    ``S×1`` (``"v"``), ``1×S`` (``"h"``) and ``S×S`` (``"s"``), and each kernel set is convolved
    depthwise over the query feature ("same" padding, stride 1, no bias).

    Args:
        channels: ``C`` of the support and query features.
        kernel_size: odd ``S`` (paper: 5; Table 4 tries 3, 5, 7, 9).
        variants: which kernels to use, any non-empty subset of ``("v", "h", "s")`` in the output
            order (paper Table 5).
        square_source: ``"serial"`` (default, Table A1 "5→25": the square kernel is generated from the
            ``2S`` asymmetric kernel vectors pooled to ``S²``) or ``"parallel"`` ("5/25": from the
            foreground pooled to ``S²``). With ``"serial"`` and ``"s"`` alone, the ``v``/``h``
            generators still exist as the first stage of the square kernel.
        kgen_kernel_size: kernel size of the generators' 1-D convolutions.
        fg_threshold: foreground threshold on the resized support mask, in the open interval ``(0, 1)``.
        kernel_norm: ``None`` (the paper: raw generated kernels), ``"l1"`` or ``"l2"``: each generated
            kernel divided by its L1 / L2 norm over its taps, per sample and channel
            (:func:`dcm.functional.normalize_kernel`). ``"l1"`` keeps every output within the range of
            the query feature whatever the kernel size and feature scale.

    Shape:
        - query: ``Tensor[B, C, H, W]``
        - support: ``Tensor[B, K, C, Hs, Ws]`` or ``Tensor[B, C, Hs, Ws]``
        - support_mask: ``Tensor[B, K, h, w]`` or ``Tensor[B, h, w]``, any resolution, values in
          ``[0, 1]`` or ``{0, 1, 255}`` (255 = background)
        - output: tuple of ``len(variants)`` tensors ``Tensor[B, C, H, W]``

    Edge cases: fewer foreground pixels than ``S²`` replicate entries (adaptive pooling); an empty
    shot contributes nothing; a sample with no foreground in any shot uses its whole-image average
    as the single foreground vector (one :class:`dcm.EmptyForegroundWarning`); support positions
    outside the foreground never reach the output (NaN / Inf there included). ``query`` and
    ``support`` must have the parameters' dtype unless autocast is on (else ``TypeError``). The options
    ``kernel_size``, ``variants``, ``square_source``, ``fg_threshold`` and ``kernel_norm`` are checked when
    they are set (here or as attributes later), not at every call.

    Example:
        >>> dcm_layer = DynamicConvModule(16)
        >>> q, s, m = torch.randn(2, 16, 30, 30), torch.randn(2, 5, 16, 30, 30), torch.rand(2, 5, 60, 60).round()
        >>> [tuple(o.shape) for o in dcm_layer(q, s, m)]
        [(2, 16, 30, 30), (2, 16, 30, 30), (2, 16, 30, 30)]
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 5,
        variants: Sequence[str] = ("v", "h", "s"),
        square_source: str = "serial",
        kgen_kernel_size: int = 3,
        fg_threshold: float = 0.5,
        kernel_norm: Optional[str] = None,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.channels = _check.positive_int("channels", channels)
        self.kernel_size, self.variants, self.square_source = kernel_size, variants, square_source
        self.kernel_norm, self.fg_threshold = kernel_norm, fg_threshold
        variants, square_source = self.variants, self.square_source
        need = [v for v in ("v", "h") if v in variants or ("s" in variants and square_source == "serial")]
        need += ["s"] if "s" in variants else []
        self.generators = nn.ModuleDict({v: KernelGenerator(channels, kgen_kernel_size, device, dtype) for v in need})

    kernel_size = _check.option("kernel_size", _check.odd_int)
    variants = _check.option("variants", _variants)
    square_source = _check.option("square_source", _square_source)
    fg_threshold = _check.option("fg_threshold", _check.fg_threshold)
    kernel_norm = _check.option("kernel_norm", _kernel_norm)

    @property
    def out_channels(self) -> int:
        """Channels of the concatenated outputs: ``len(variants) * channels``."""
        return len(self.variants) * self.channels

    def generate_kernels(self, support: torch.Tensor, support_mask: torch.Tensor) -> dict:
        """``{"v": Tensor[B, C, S, 1], "h": Tensor[B, C, 1, S], "s": Tensor[B, C, S, S]}`` (the used variants)."""
        support, support_mask = _check.support_and_mask("support", support, "support_mask", support_mask, channels=self.channels)
        self._check_dtype("support", support)
        return _generate_dynamic_kernels(support, support_mask, self.generators, *self._options())

    def forward(self, query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        query, support, support_mask = _check.episode(query, support, support_mask, channels=self.channels)
        self._check_dtype("query", query)
        self._check_dtype("support", support)
        return _dynamic_convolution(query, support, support_mask, self.generators, *self._options())

    def _options(self) -> tuple:
        return self.kernel_size, self.variants, self.square_source, self.fg_threshold, self.kernel_norm

    def _check_dtype(self, name: str, x: torch.Tensor) -> None:
        _check.param_dtype(name, x, next(self.generators.parameters()).dtype, "DynamicConvModule")

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, variants={self.variants}, "
            f"square_source={self.square_source!r}, fg_threshold={self.fg_threshold}, kernel_norm={self.kernel_norm!r}"
        )
