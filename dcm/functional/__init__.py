"""Stateless maths of the DPCN modules: plain tensors in, plain tensors out.

Each op checks its arguments (shapes, dtypes, devices, mask values) once and then runs a private
implementation, which the modules of :mod:`dcm.modules` call after their own single check; the building
blocks :func:`prepare_mask`, :func:`shot_weights`, :func:`normalize_minmax` and
:func:`foreground_pool_weights` take their inputs unchecked. Everything is vectorised over batch and
shots (no Python loop over samples, no ``.item()``, no boolean indexing), so it works under
``torch.compile(fullgraph=True)`` and CUDA graphs.
"""
from .dynamic_conv import (
    dynamic_convolution,
    dynamic_depthwise_conv2d,
    dynamic_depthwise_conv2d_multi,
    generate_dynamic_kernels,
    normalize_kernel,
)
from .feature_filtering import FilterOutput, feature_filtering, support_prototype
from .foreground import foreground_pool, foreground_pool_weights, foreground_selection
from .masks import masked_average_pool, prepare_mask, shot_weights
from .support_activation import normalize_minmax, support_activation, support_activation_raw

__all__ = [
    "FilterOutput",
    "dynamic_convolution",
    "dynamic_depthwise_conv2d",
    "dynamic_depthwise_conv2d_multi",
    "feature_filtering",
    "foreground_pool",
    "foreground_pool_weights",
    "foreground_selection",
    "generate_dynamic_kernels",
    "normalize_kernel",
    "masked_average_pool",
    "normalize_minmax",
    "prepare_mask",
    "shot_weights",
    "support_activation",
    "support_activation_raw",
    "support_prototype",
]
