"""Build script: the Python package, the Triton kernels (as ``vitprune_fast.kernels``) and the C++ extension.

The C++ extension is built only when torch is importable at build time (``pip install --no-build-isolation``).
Otherwise it is compiled on first use with ninja (``torch.utils.cpp_extension.load``); if that fails too the
library falls back to plain torch and warns once.
"""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("VITPRUNE_FAST_NO_EXT", "0") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        ext_modules = [
            CppExtension(
                "vitprune_fast._C",
                ["csrc/compact.cpp"],
                # -fopenmp makes at::parallel_for really parallel (it is header-inline); the OpenMP runtime is
                # the libgomp torch already loaded.
                extra_compile_args=["-O3", "-fopenmp"],
                extra_link_args=["-fopenmp"],
            )
        ]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    except ImportError:  # torch not in the build environment: JIT build at first use instead
        pass

setup(
    packages=["vitprune_fast", "vitprune_fast.arch", "vitprune_fast.score", "vitprune_fast.kernels"],
    package_dir={"vitprune_fast.kernels": "kernels"},
    package_data={"vitprune_fast": ["csrc/*.cpp"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
