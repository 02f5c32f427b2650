"""Thin ``nn.Module`` wrappers that own the parameters and call :mod:`dcm.functional`."""
from .dynamic_conv import DynamicConvModule, KernelGenerator
from .feature_filtering import FeatureFiltering, FilterOutput
from .support_activation import ActivationOutput, SupportActivation

__all__ = ["ActivationOutput", "DynamicConvModule", "FeatureFiltering", "FilterOutput", "KernelGenerator", "SupportActivation"]
