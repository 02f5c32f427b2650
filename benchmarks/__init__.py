"""The few-shot segmentation benchmark harness (repository code, not installed with ``dcm``).

Public names: the datasets (``PascalFewShot``, ``CocoFewShot``, ``FSS1000``, ``SyntheticFewShot``,
``build_dataset``), ``collate_episodes``, ``Protocol``, ``evaluate``, ``EvaluationResult``,
``dataset_factory`` and the ``metrics`` module. ``benchmarks.transforms`` (torchvision) and the COCO
JSON reader (pycocotools) are imported lazily.
"""
from . import datasets, metrics
from .datasets import (FSS1000, CocoFewShot, CorruptFileError, DatasetError, Episode, FewShotDataset, PascalFewShot, SyntheticFewShot,
                       build_dataset, collate_episodes)
from .protocols import BAM_SEEDS, EvaluationResult, Protocol, dataset_factory, evaluate
from .metrics import FewShotIoU, intersection_and_union

__all__ = [
    "datasets", "metrics", "collate_episodes", "build_dataset", "FewShotDataset", "Episode", "DatasetError", "CorruptFileError",
    "PascalFewShot", "CocoFewShot", "FSS1000", "SyntheticFewShot",
    "Protocol", "EvaluationResult", "evaluate", "dataset_factory", "BAM_SEEDS",
    "FewShotIoU", "intersection_and_union",
]
