"""Packaging beyond what pyproject.toml can declare: ship `conf/` and `recipes/` in the wheel.

The configs stay at the top of the checkout (where users read and copy them) and are
installed as `lmmtune/conf` and `lmmtune/recipes`, which `lmmtune.config` finds in a
wheel install as it finds the checkout's folders in an editable one.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["lmmtune", "lmmtune.*"]), "lmmtune.conf", "lmmtune.recipes"],
    package_dir={"lmmtune.conf": "conf", "lmmtune.recipes": "recipes"},
    package_data={"lmmtune.conf": ["*.yaml", "*/*.yaml"], "lmmtune.recipes": ["*.yaml"]},
)
