"""Build megasyne: the Python package, the Triton kernels (as ``megasyne.kernels``)
and the C++ sample-index builder in ``csrc/`` (as ``megasyne._csrc``).

The extension is compiled here, at install time, and never at import: a machine
without a C++17 compiler fails *now* with a clear message, instead of rank 0
compiling at start-up while the other ranks wait (Megatron-LM's ``make`` in
``helpers.py`` hangs jobs exactly that way).
"""

from glob import glob

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError as exc:  # pragma: no cover - only without build isolation
    raise SystemExit(
        "megasyne: building csrc/ needs pybind11 (pip install pybind11>=2.12) "
        f"before `pip install -e .` when build isolation is off ({exc})."
    ) from None


class BuildExtWithClearErrors(build_ext):
    """build_ext that turns a compiler failure into one actionable message."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, missing executable
            raise SystemExit(
                f"megasyne: failed to compile the C++ extension {ext.name} from {ext.sources}.\n"
                "A C++17 compiler is required (Debian/Ubuntu: apt-get install g++; "
                "conda: conda install gxx_linux-64).\n"
                f"Underlying error: {type(exc).__name__}: {exc}"
            ) from exc


csrc_sources = sorted(glob("csrc/*.cpp"))
ext_modules = [
    Pybind11Extension(
        "megasyne._csrc",
        csrc_sources,
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
] if csrc_sources else []

packages = find_packages(include=["megasyne", "megasyne.*"]) + ["megasyne.kernels"]

setup(
    name="megasyne",
    version="0.1.0",
    description="Megatron-Core continual pre-training of Llama-3 with Triton kernels "
    "and a mixture + curriculum data pipeline (Llama-3-SynE recipe)",
    python_requires=">=3.10",
    packages=packages,
    # kernels/ lives at the repository root but is imported as megasyne.kernels.
    package_dir={"megasyne.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtWithClearErrors},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",
        "numpy",
        "pyyaml",
        "tqdm",
        "psutil",
        "xxhash",
        "safetensors",
        "tokenizers",
        "sentencepiece",
    ],
    extras_require={
        # Used only when they import cleanly on a CUDA machine; never on CPU.
        "gpu": ["transformer-engine[pytorch]"],
        "test": ["pytest", "transformers"],
        # Optional: ~3x faster JSON-lines parsing in the preprocessor (json is the fallback);
        # tiktoken: Llama-3's tokenizer.model, and its tokenizer.json 4-5x faster per core than
        # the tokenizers library, same ids (the library is the fallback for tokenizer.json).
        "fast": ["orjson>=3.10", "tiktoken>=0.7"],
    },
    include_package_data=False,
    zip_safe=False,
)
