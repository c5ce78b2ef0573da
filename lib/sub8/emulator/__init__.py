"""Software int8 accelerator: integer kernels (``kernels``) and b-bit weight packing (``packing``)."""
