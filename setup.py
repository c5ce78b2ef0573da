"""The one compiled piece of sub8: the MRACos regularizer's CPU kernel (lib/sub8/quant/_kernels.c). Everything else
is configured in pyproject.toml. Plain C against Python's headers only (no PyTorch headers), so it builds in about a
second with the system's C compiler; sub8 falls back to the PyTorch version of the kernel where it is not built.

The floating-point flags let GCC vectorize the kernel's clamps and selects (MIN/MAX and blends need "no NaN, no
signed zeros"); the kernel keeps its table indices in bounds for any input, NaN included, and nothing in it relies on
NaN or -0 propagating (a NaN weight makes the training loss NaN, which the training loop refuses).
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
            ],
        )
    ]
)
