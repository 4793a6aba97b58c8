"""Attention kernels: head kinds, plain-torch references, and the hybrid custom ops.

Importing this package registers ``torch.ops.hydracc.hybrid_attention`` and
``torch.ops.hydracc.hybrid_decode`` (it never imports triton: the Triton kernels in
``triton_prefill`` / ``triton_decode`` load on the first CUDA call).

Layout (as flash-linear-attention's ``fla/ops/<op>/``: the plain reference beside the kernel):

- ``kinds/``: the kind table (``HEAD_KINDS``) and one module per kind with its reference
  forward, recurrent step, decode-state shapes and parameters;
- ``layout.py``: layout types (``DecodeLayout``, ``DecodeTensors``) and input validation, a
  leaf that imports only the kind table;
- ``naive.py``: the hybrid layer in plain torch, reference of both ops;
- prefill, ``hydracc::hybrid_attention``: ``hybrid_op.py`` (the op), ``composed.py`` (CPU),
  ``triton_prefill.py`` (CUDA);
- decode, ``hydracc::hybrid_decode``: ``decode_op.py`` (the op; CPU runs ``naive``),
  ``triton_decode.py`` (CUDA);
- ``triton_common.py``: Triton helpers; ``reference.py`` / ``head_kinds.py``: the older
  import paths, forwarding with a ``DeprecationWarning``.
"""

from hydracc.kernels.decode_op import (
    DECODE_OP_NAME,
    DECODE_OP_SCHEMA,
    hybrid_decode,
    hybrid_decode_op,
)
from hydracc.kernels.hybrid_op import (
    OP_NAME,
    OP_SCHEMA,
    hybrid_attention,
    hybrid_attention_op,
)
from hydracc.kernels.kinds import (
    ELU,
    FULL,
    GDN,
    HEAD_KINDS,
    HEDGEHOG,
    KIND_NAMES,
    PARAM_NAMES,
    STREAMING,
    HeadKind,
    kind_by_code,
    kind_by_name,
    param_shapes,
    state_shapes,
)
from hydracc.kernels.kinds.elu import causal_linear_attention, causal_linear_attention_recurrent, elu_feature_map
from hydracc.kernels.kinds.full import causal_softmax_attention
from hydracc.kernels.kinds.gdn import gated_delta_rule, gated_delta_rule_recurrent, gdn_gates
from hydracc.kernels.kinds.hedgehog import hedgehog_attention, hedgehog_attention_recurrent, hedgehog_feature_map
from hydracc.kernels.kinds.streaming import causal_streaming_attention, streaming_attention
from hydracc.kernels.layout import DecodeLayout, DecodeTensors, decode_layout, validate_hybrid_inputs
from hydracc.kernels.naive import (
    fuse_linear_output,
    hybrid_attention_reference,
    hybrid_decode_reference,
    linear_state_step,
    run_kind,
)

__all__ = [
    "DECODE_OP_NAME",
    "DECODE_OP_SCHEMA",
    "ELU",
    "FULL",
    "GDN",
    "HEAD_KINDS",
    "HEDGEHOG",
    "KIND_NAMES",
    "OP_NAME",
    "OP_SCHEMA",
    "PARAM_NAMES",
    "STREAMING",
    "DecodeLayout",
    "DecodeTensors",
    "HeadKind",
    "causal_linear_attention",
    "causal_linear_attention_recurrent",
    "causal_softmax_attention",
    "causal_streaming_attention",
    "decode_layout",
    "elu_feature_map",
    "fuse_linear_output",
    "gated_delta_rule",
    "gated_delta_rule_recurrent",
    "gdn_gates",
    "hedgehog_attention",
    "hedgehog_attention_recurrent",
    "hedgehog_feature_map",
    "hybrid_attention",
    "hybrid_attention_op",
    "hybrid_attention_reference",
    "hybrid_decode",
    "hybrid_decode_op",
    "hybrid_decode_reference",
    "kind_by_code",
    "kind_by_name",
    "linear_state_step",
    "param_shapes",
    "run_kind",
    "state_shapes",
    "streaming_attention",
    "validate_hybrid_inputs",
]
