"""The one compiled piece of sub8: the CPU kernels of the MRACos regularizer and of GQ (lib/sub8/quant/_kernels.c).
Everything else is configured in pyproject.toml. Plain C against Python's headers only (no PyTorch headers), so it
builds in about a second with the system's C compiler; sub8 falls back to the PyTorch versions where it is not built.

-fopenmp: the kernels run on PyTorch's OpenMP thread pool (sub8.quant.kernels). The floating-point flags let GCC
vectorize the kernels' clamps and selects (MIN/MAX and blends need "no NaN, no signed zeros"); the kernels keep their
table indices in bounds for any input, NaN included, and nothing in them relies on NaN or -0 propagating (non-finite
weights are found by a bit test; _kernels.c says what happens to them).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sub8.quant._kernels",
            sources=["lib/sub8/quant/_kernels.c"],
            extra_compile_args=[
                "-O3",
                "-std=c11",
                "-fno-math-errno",
                "-fno-trapping-math",
                "-ffinite-math-only",
                "-fno-signed-zeros",
                "-fopenmp",
            ],
            extra_link_args=["-fopenmp"],
        )
    ]
)
