"""Scoring few-shot segmentation: :mod:`~benchmarks.scoring.protocols` (the evaluation protocol and
:func:`~benchmarks.scoring.protocols.evaluate`), :mod:`~benchmarks.scoring.metrics` (class mIoU, FB-IoU,
per-episode records), :mod:`~benchmarks.scoring.stats` (mean ± std over seeds, paired differences with
their seed and seed x test-image intervals) and :mod:`~benchmarks.scoring.comparison` (a seeded comparison
of several networks: its summary and its text / Markdown tables)."""
