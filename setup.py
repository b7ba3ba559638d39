# The native layer (userfaultfd binding, fault thread, workload loop) is compiled
# at install time by cffi in API mode; see postcopy_cli/_build_native.py.
from setuptools import setup

setup(cffi_modules=["postcopy_cli/_build_native.py:ffibuilder"])
