"""Thin ``nn.Module`` wrappers that own the parameters, check their inputs once (their options when
they are set) and call the implementations behind :mod:`dcm.functional`."""
from .dynamic_conv import DynamicConvModule, KernelGenerator
from .feature_filtering import FeatureFiltering, FilterOutput
from .fusion import DCM_FUSIONS, DCMFusion
from .support_activation import ActivationOutput, SupportActivation

__all__ = ["ActivationOutput", "DCM_FUSIONS", "DCMFusion", "DynamicConvModule", "FeatureFiltering", "FilterOutput", "KernelGenerator", "SupportActivation"]
