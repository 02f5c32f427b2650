"""dcm: the three modules of DPCN (CVPR 2022) as plug-in PyTorch layers for few-shot segmentation.

>>> from dcm import DynamicConvModule, SupportActivation, FeatureFiltering
>>> import dcm.functional as DF

``import dcm`` needs only torch; the Triton kernels in :mod:`dcm.kernels` load lazily on CUDA.
"""
from . import functional
from ._check import EmptyForegroundWarning
from .config import get_backend, set_backend, set_data_checks, use_backend
from .modules import (
    ActivationOutput,
    DCMFusion,
    DynamicConvModule,
    FeatureFiltering,
    FilterOutput,
    KernelGenerator,
    SupportActivation,
)

__version__ = "0.1.0"

__all__ = [
    "ActivationOutput",
    "DCMFusion",
    "DynamicConvModule",
    "EmptyForegroundWarning",
    "FeatureFiltering",
    "FilterOutput",
    "KernelGenerator",
    "SupportActivation",
    "functional",
    "get_backend",
    "set_backend",
    "set_data_checks",
    "use_backend",
    "__version__",
]
