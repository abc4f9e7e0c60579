"""Packages for setuptools (the metadata is in pyproject.toml): gd/ and its subpackages, plus the hydra configs.

conf/ stays at the top of the repository (the source of truth, read in place by a checkout) and is installed as
the package data ``gd/conf``, which the entry points read through hydra's ``pkg://gd.conf`` (gd/config.py).
pyproject.toml alone cannot map a folder outside gd/ into it while also finding gd's packages automatically.
"""
from setuptools import find_namespace_packages, find_packages, setup

CONF = ["gd.conf", *(f"gd.conf.{name}" for name in find_namespace_packages(where="conf", exclude=["*__pycache__*"]))]

setup(
    packages=[*find_packages(include=["gd", "gd.*"]), *CONF],
    package_dir={"gd.conf": "conf"},
    package_data={name: ["*.yaml"] for name in CONF},  # conf/__init__.py makes gd.conf importable for pkg://
)
