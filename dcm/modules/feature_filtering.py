"""FeatureFiltering: refine the pseudo mask and filter the query feature (DPCN §3.4)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .. import _check
from ..functional.feature_filtering import FilterOutput, _check_pseudo_mask, _feature_filtering, _support_prototype

__all__ = ["FeatureFiltering", "FilterOutput"]


class FeatureFiltering(nn.Module):
    r"""Feature Filtering Module (FFM) of DPCN (Eq. 2–4).

    ``p`` = masked average pooling of the support (shots averaged), ``M^r = σ(F((x_q ⊗ M^0) ⊕ x_p))``
    with ``F`` a ``k×k`` convolution ``C -> 1``, and ``x̃_q = (x_q ⊗ M^r) ⊕ x_q``.

    Args:
        channels: ``C``.
        kernel_size: odd size of the refinement convolution (3; 1 is the alternative;
            docs/CONVENTIONS.md#ffm-refinement-conv).
        eps: masked-average-pooling epsilon (PFENet 0.0005), ``>= 0``.

    ``query`` and ``support`` must have the parameters' dtype unless autocast is on (else ``TypeError``).
    ``eps`` is checked when it is set (here or as an attribute later), not at every call.

    Shape:
        - query: ``Tensor[B, C, H, W]``; support: ``Tensor[B, K, C, Hs, Ws]`` or ``Tensor[B, C, Hs, Ws]``
        - support_mask: ``Tensor[B, K, h, w]`` or ``Tensor[B, h, w]``; pseudo_mask: ``Tensor[B, 1, h', w']``
        - output: :class:`FilterOutput` ``(prototype[B, C], refined_mask[B, 1, H, W], filtered[B, C, H, W])``

    Example:
        >>> ffm = FeatureFiltering(8)
        >>> out = ffm(torch.randn(2, 8, 9, 9), torch.randn(2, 3, 8, 9, 9), torch.ones(2, 3, 9, 9), torch.rand(2, 1, 9, 9))
        >>> tuple(out.prototype.shape), tuple(out.refined_mask.shape), tuple(out.filtered.shape)
        ((2, 8), (2, 1, 9, 9), (2, 8, 9, 9))
        >>> FeatureFiltering(8, kernel_size=1)
        FeatureFiltering(
          channels=8, kernel_size=1, eps=0.0005
          (conv): Conv2d(8, 1, kernel_size=(1, 1), stride=(1, 1))
        )
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        eps: float = 5e-4,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.channels = _check.positive_int("channels", channels)
        k = _check.odd_size("kernel_size", kernel_size)[0]
        self.kernel_size, self.eps = k, eps
        self.conv = nn.Conv2d(channels, 1, k, padding=k // 2, device=device, dtype=dtype)

    eps = _check.option("eps", _check.nonneg_eps)

    def forward(self, query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor, pseudo_mask: torch.Tensor) -> FilterOutput:
        query, support, support_mask = _check.episode(query, support, support_mask, channels=self.channels)
        for name, x in (("query", query), ("support", support)):
            _check.param_dtype(name, x, self.conv.weight.dtype, "FeatureFiltering")
        pseudo_mask = _check_pseudo_mask(pseudo_mask, query)
        proto = _support_prototype(support, support_mask, self.eps)
        return _feature_filtering(query, proto, pseudo_mask, self.conv.weight, self.conv.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, eps={self.eps}"
