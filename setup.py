"""Maps the top-level source folders onto `titans_train.*` subpackages (DESIGN section 2).

Metadata lives in pyproject.toml; this file only exists because the folder -> package mapping
must also cover every nested subpackage, which static configuration cannot discover. Folders that
hold only data (recipe parts, sbatch templates) are namespace packages: declared, so setuptools
ships their files without warning that they would be ignored.
"""

from setuptools import find_namespace_packages, setup

PACKAGE_ROOTS = {
    "titans_train": "titans_train",
    "titans_train.parallel": "parallel",
    "titans_train.kernels": "kernels",
    "titans_train.data": "data",
    "titans_train.recipes": "recipes",
    "titans_train.slurm": "slurm",
}

packages = []
for package, folder in PACKAGE_ROOTS.items():
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__*", "__pycache__"])]

setup(
    packages=packages,
    package_dir=PACKAGE_ROOTS,
    package_data={"": ["*.md", "*.yaml", "*.cpp"], "titans_train.slurm.templates": ["*"]},
)
