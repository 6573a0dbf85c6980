"""Packaging glue that pyproject.toml cannot express: the repository keeps the config tree, the
recipes and the SLURM templates at its top level (conf/, recipes/, slurm/), and an installed ftl
needs them inside its package. Building a wheel copies them to launcher/_shipped/ (launcher/paths.py
looks there first); MANIFEST.in puts them into the sdist. Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("conf", "recipes", "slurm")


class build_py_with_configs(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's own folders
        for name in SHIPPED:
            self.copy_tree(name, str(Path(self.build_lib) / "launcher" / "_shipped" / name))


setup(cmdclass={"build_py": build_py_with_configs})
