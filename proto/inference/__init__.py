"""Generated code for the Open Inference Protocol (KServe v2 / Triton `inference` package)."""
