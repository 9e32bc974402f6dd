"""The version of hf-collapse, in one place: the package, its model cards and its build metadata read it."""

__version__ = "0.1.0"
