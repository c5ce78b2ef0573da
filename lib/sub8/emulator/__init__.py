"""Software int8 accelerator: integer kernels (``kernels``), b-bit weight packing (``packing``), and the latency and
memory model with a streaming simulation of transducer decoding (``device``)."""
