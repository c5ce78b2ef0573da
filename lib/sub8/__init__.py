"""sub8: sub-8-bit quantization-aware training for on-device speech recognition."""

__version__ = "0.1.0"
