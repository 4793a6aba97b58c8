"""Attention kernels: head kinds, plain-torch references, and the hybrid custom op.

Importing this package registers ``torch.ops.hydracc.hybrid_attention``.
"""

from hydracc.kernels.head_kinds import (
    ELU,
    FULL,
    HEAD_KINDS,
    KIND_NAMES,
    HeadKind,
    kind_by_code,
    kind_by_name,
)
from hydracc.kernels.hybrid_op import (
    OP_NAME,
    OP_SCHEMA,
    hybrid_attention,
    hybrid_attention_op,
)
from hydracc.kernels.reference import (
    causal_linear_attention,
    causal_linear_attention_recurrent,
    causal_softmax_attention,
    elu_feature_map,
    hybrid_attention_reference,
    validate_hybrid_inputs,
)

__all__ = [
    "ELU",
    "FULL",
    "HEAD_KINDS",
    "KIND_NAMES",
    "OP_NAME",
    "OP_SCHEMA",
    "HeadKind",
    "causal_linear_attention",
    "causal_linear_attention_recurrent",
    "causal_softmax_attention",
    "elu_feature_map",
    "hybrid_attention",
    "hybrid_attention_op",
    "hybrid_attention_reference",
    "kind_by_code",
    "kind_by_name",
    "validate_hybrid_inputs",
]
