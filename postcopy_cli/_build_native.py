"""cffi build script (API mode) for ``postcopy_cli._native``.

Each part of the native layer is a pair of files in ``native/``: ``NAME.cdef``
holds the declarations Python sees (grouped by header, as cffi parses them
without a preprocessor) and ``NAME.c`` the code.  All parts are compiled into
one extension at install time.
"""
import os
from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent / "native"

ffibuilder = FFI()
for cdef in sorted(NATIVE.glob("*.cdef")):
    ffibuilder.cdef(cdef.read_text(), override=False)

ffibuilder.set_source(
    "postcopy_cli._native",
    "".join(f'#include "{h.name}"\n' for h in sorted(NATIVE.glob("*.h"))),
    sources=[os.path.relpath(p) for p in sorted(NATIVE.glob("*.c"))],
    include_dirs=[str(NATIVE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    libraries=["pthread", "ssl", "crypto"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
