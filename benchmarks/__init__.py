"""The few-shot segmentation benchmark harness (repository code, not installed with ``dcm``).

Layout: the top level holds only the commands a user runs (``python benchmarks/<name>.py --help``); the
library they share lives in three sub-packages::

    datasets/     the episode datasets (PASCAL-5i, COCO-20i, FSS-1000, synthetic), collate_episodes,
                  transforms (PFENet's augmentation, test-time resizing)
    scoring/      protocols (Protocol, evaluate), metrics (class mIoU, FB-IoU), stats (seed and
                  seed x image intervals), comparison (a seeded comparison's summary and its tables)
    engine/       config (recipes), training, the evaluation of finished runs, checkpoints, run folders,
                  the feature cache, inference (predict on your own images), output-path checks

Public names here: the datasets (``PascalFewShot``, ``CocoFewShot``, ``FSS1000``, ``SyntheticFewShot``,
``build_dataset``), ``collate_episodes``, ``Protocol``, ``evaluate``, ``EvaluationResult``,
``dataset_factory``, ``FewShotIoU`` and ``intersection_and_union``. ``benchmarks.datasets.transforms``
(torchvision) and the COCO JSON reader (pycocotools) are imported lazily.
"""
from . import datasets, scoring
from .datasets import (FSS1000, CocoFewShot, CorruptFileError, DatasetError, Episode, FewShotDataset, PascalFewShot, SyntheticFewShot,
                       build_dataset, collate_episodes)
from .scoring.protocols import BAM_SEEDS, EvaluationResult, Protocol, dataset_factory, evaluate
from .scoring.metrics import FewShotIoU, intersection_and_union

__all__ = [
    "datasets", "scoring", "collate_episodes", "build_dataset", "FewShotDataset", "Episode", "DatasetError",
    "CorruptFileError", "PascalFewShot", "CocoFewShot", "FSS1000", "SyntheticFewShot",
    "Protocol", "EvaluationResult", "evaluate", "dataset_factory", "BAM_SEEDS",
    "FewShotIoU", "intersection_and_union",
]
