"""dcm: the three modules of DPCN (CVPR 2022) as plug-in PyTorch layers for few-shot segmentation.

>>> from dcm import DynamicConvModule, SupportActivation, FeatureFiltering
>>> import dcm.functional as DF

``import dcm`` needs only torch; the Triton kernels in :mod:`dcm.kernels` load lazily on CUDA. Under the
default backend ``"auto"`` a CUDA op runs its kernels only where they passed their CUDA tests on a GPU
(:mod:`dcm.verification`); ``dcm.backend_report("cuda")`` says which.
"""
from . import functional
from ._check import EmptyForegroundWarning
from .config import get_backend, set_backend, set_data_checks, use_backend
from .modules import (
    DCM_FUSIONS,
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
    "DCM_FUSIONS",
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
    "backend_report",
    "__version__",
]


def __getattr__(name: str):
    # dcm.backend_report from dcm.verification, imported on first use (``python -m dcm.verification``
    # then runs a module that ``import dcm`` did not import already)
    if name == "backend_report":
        from .verification import backend_report

        return backend_report
    raise AttributeError(f"module 'dcm' has no attribute {name!r}")
