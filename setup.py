"""Kept for the layout that lists it and for tools that still call `setup.py`: everything
(metadata, dependencies, extras, packages) is declared in pyproject.toml, which setuptools reads."""
from setuptools import setup

setup()
