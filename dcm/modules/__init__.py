"""Thin ``nn.Module`` wrappers that own the parameters and call :mod:`dcm.functional`."""
from .dynamic_conv import DynamicConvModule, KernelGenerator
from .feature_filtering import FeatureFiltering, FilterOutput
from .fusion import DCMFusion
from .support_activation import ActivationOutput, SupportActivation

__all__ = ["ActivationOutput", "DCMFusion", "DynamicConvModule", "FeatureFiltering", "FilterOutput", "KernelGenerator", "SupportActivation"]
