"""hydracc: turn a pretrained transformer into a head-level hybrid of full and linear attention."""

__version__ = "0.1.0"


def load(path, *, dtype=None, device="cpu"):  # noqa: ANN001, ANN201 - thin lazy wrapper
    """Load a converted checkpoint; see :func:`hydracc.runtime.load`."""
    from hydracc.runtime import load as _load

    return _load(path, dtype=dtype, device=device)
