"""Build script. Package metadata lives in pyproject.toml; this file is where compiled extensions
(the CUDA C++ backend, ``ghost_kernels._C``) are added to the build."""
from setuptools import setup

setup()
