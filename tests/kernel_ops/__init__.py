"""Kernel tests (a package named so that it shadows no installed package: transformers imports `kernels`)."""
