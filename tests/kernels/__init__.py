"""Kernel tests (a package so ``kernels.kernel_cases`` resolves here, not to an installed ``kernels``)."""
