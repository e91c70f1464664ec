"""Builds the Cython core (cext/) into the emu package."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("EMU_DEBUG") == "1"
ext = Extension(
    "emu._core",
    ["cext/_core.pyx"],
    include_dirs=["cext"],
    depends=["cext/layout.h", "cext/fastpath.h", "cext/sigrec.h"],
    extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
)
setup(
    ext_modules=cythonize(
        [ext],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                             "initializedcheck": False, "linetrace": debug,
                             "binding": False},
    )
)
