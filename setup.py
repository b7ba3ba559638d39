# The native layer (userfaultfd binding, fault thread, workload loop) is compiled
# at install time by cffi in API mode; see postcopy_cli/_build_native.py.
from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel

# The oldest Python the project supports (pyproject's requires-python).
ABI3_SINCE = "cp310"


class bdist_wheel_abi3(bdist_wheel):
    """Tag the wheel abi3 when every extension really is built for the stable ABI.

    cffi compiles its module with Py_LIMITED_API (and names it ``.abi3.so``)
    unless the interpreter cannot load such modules (a debug or free-threaded
    build); it says which by setting ``py_limited_api`` on the Extension.
    """

    def get_tag(self):
        exts = self.distribution.ext_modules or []
        if not self.py_limited_api and exts and all(getattr(e, "py_limited_api", False) for e in exts):
            self.py_limited_api = ABI3_SINCE
        return super().get_tag()


setup(cffi_modules=["postcopy_cli/_build_native.py:ffibuilder"], cmdclass={"bdist_wheel": bdist_wheel_abi3})
