"""The package version, written here only (pyproject.toml reads it; ``ghost_kernels.__version__``)."""
__version__ = "0.3.0"
