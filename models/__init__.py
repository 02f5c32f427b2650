"""Networks assembled from ``dcm``'s public API: backbones, DPCN, PFENet(+DCM), CANet(+DCM).

Repository code (not installed): scripts put the repository root on ``sys.path``; tests get it
from pytest's ``pythonpath``. Dependency direction: ``models`` -> ``dcm``, never the reverse.
"""

# ---------------------------------------------------------------- backbones (GitHub issue 3)
from .backbones import (
    BACKBONES,
    Backbone,
    BackboneFeatures,
    BackboneWeightsWarning,
    LoadReport,
    available_backbones,
    build_backbone,
    load_backbone_weights,
)

# ---------------------------------------------------------------- networks and build_model
from .registry import MODELS, build_model, list_models
from .dpcn import ABLATIONS, DPCN

__all__ = [
    # backbones
    "BACKBONES",
    "Backbone",
    "BackboneFeatures",
    "BackboneWeightsWarning",
    "LoadReport",
    "available_backbones",
    "build_backbone",
    "load_backbone_weights",
    # networks (PFENet / CANet load lazily through build_model, or import models.pfenet / models.canet)
    "ABLATIONS",
    "DPCN",
    "MODELS",
    "build_model",
    "list_models",
]
