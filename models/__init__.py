"""Networks assembled from ``dcm``'s public API: backbones, DPCN, PFENet(+DCM), CANet(+DCM), each taking its
DCM as one :class:`DCMSpec` (``models.dcm_spec``); comparison arms (``models.arms``).

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
from .dcm_spec import DCMSpec, preset
from .registry import MODELS, build_model, list_models
from .migrate import migrate_model_config
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
    # how a DCM sits in a network (models/dcm_spec.py), and configs of earlier releases (models/migrate.py)
    "DCMSpec",
    "preset",
    "migrate_model_config",
]
