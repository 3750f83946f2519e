"""Build script: the Python package, the Triton kernels (as ``vitprune_fast.kernels``) and the C++ extension.

The C++ extension is built when torch is importable at build time (``pip install --no-build-isolation``).
If it can't be built (no torch in the build environment, no compiler), installation still succeeds: the
extension is compiled with ninja on first use (``torch.utils.cpp_extension.load``), and if that fails too the
library falls back to plain torch and warns once.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSource(build_py):
    """Ship csrc/compact.cpp inside the package so a non-editable install can still JIT-build it."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "vitprune_fast" / "csrc"
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "csrc" / "compact.cpp", dst / "compact.cpp")


ext_modules = []
cmdclass = {"build_py": BuildPyWithSource}
if os.environ.get("VITPRUNE_FAST_NO_EXT", "0") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        class OptionalBuildExtension(BuildExtension):
            """A failed compile must not fail the install: the library then JIT-builds or uses plain torch."""

            def run(self):
                try:
                    super().run()
                except Exception as e:  # compiler errors come in many types
                    print(f"vitprune_fast: C++ extension not built ({e}); it will be JIT-compiled on first use "
                          "or fall back to plain torch", file=sys.stderr)

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
        cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)
    except ImportError:  # torch not in the build environment: JIT build at first use instead
        pass

setup(
    packages=find_packages(include=["vitprune_fast", "vitprune_fast.*"]) + ["vitprune_fast.kernels"],
    package_dir={"vitprune_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
