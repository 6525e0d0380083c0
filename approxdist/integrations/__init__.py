"""Glue to other training frameworks, each an optional dependency imported only by its
own module: `approxdist.integrations.lightning` (PyTorch Lightning). Hugging Face
Accelerate and timm need no glue (docs/integrations.md gives the lines to add).

Like train/ and bench/, these modules are clients of the library: public names only."""
