"""Few-shot segmentation datasets with one episode record format (docs/CONTRACTS.md).

``PascalFewShot`` (PASCAL-5i), ``CocoFewShot`` (COCO-20i), ``FSS1000`` and ``SyntheticFewShot`` share
:class:`FewShotDataset`: class pools after the area filter, the PFENet query rule, deterministic
episodes. Batch them with :func:`collate_episodes`.
"""
from __future__ import annotations

from ._io import CorruptFileError, DatasetError
from .base import Episode, FewShotDataset, binarize, collate_episodes
from .coco import COCO_CLASSES, CocoFewShot, coco_fold_classes
from .fss import FSS1000
from .pascal import VOC_CLASSES, PascalFewShot, pascal_fold_classes
from .synthetic import SYNTHETIC_CLASSES, SyntheticFewShot, synthetic_fold_classes, synthetic_image

__all__ = [
    "FewShotDataset", "Episode", "DatasetError", "CorruptFileError", "collate_episodes", "binarize", "build_dataset", "DATASETS",
    "PascalFewShot", "CocoFewShot", "FSS1000", "SyntheticFewShot",
    "pascal_fold_classes", "coco_fold_classes", "synthetic_fold_classes", "synthetic_image",
    "VOC_CLASSES", "COCO_CLASSES", "SYNTHETIC_CLASSES",
]

DATASETS = {
    "pascal": PascalFewShot,
    "coco": CocoFewShot,
    "fss": FSS1000,
    "fss1000": FSS1000,
    "synthetic": SyntheticFewShot,
}


def build_dataset(name: str, **kwargs) -> FewShotDataset:
    """Construct a dataset by name (``'pascal'``, ``'coco'``, ``'fss'``, ``'synthetic'``).

    Example:
        >>> ds = build_dataset("synthetic", fold=0, shot=1, split="val", num_images=40, episodes=5, image_size=32)
        >>> len(ds), sorted(ds[0])[:3]
        (5, ['class_id', 'class_index', 'query_img'])
    """
    try:
        cls = DATASETS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {name!r}") from None
    return cls(**kwargs)
