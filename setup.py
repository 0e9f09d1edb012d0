"""Builds only the private C++ extension `sdk._C`; all metadata lives in pyproject.toml."""

from glob import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

# Compile the csrc/ files in parallel (NPY_NUM_BUILD_JOBS jobs, default: one per core).
ParallelCompile("NPY_NUM_BUILD_JOBS").install()

VERSION = "0.1.0"  # keep equal to pyproject's [project].version (a test checks _C.__version__)

ext = Pybind11Extension(
    "sdk._C",
    sorted(glob("csrc/**/*.cpp", recursive=True)),
    depends=sorted(glob("csrc/**/*.h", recursive=True)),  # a changed header rebuilds the extension
    cxx_std=17,
    define_macros=[("VERSION_INFO", VERSION)],
    # No -march=native: AVX2/FMA kernels are compiled per function and picked at run time.
    extra_compile_args=["-O3"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
