"""Python face of ltscale's fused ops: each op has a torch reference with the same signature."""

from ltscale.ops.fusion import (
    context_prediction_fusion,
    fused_available,
    fused_build_info,
    fused_device_problem,
    fused_unsupported_reason,
    fusion_fused,
    fusion_reference,
    fusion_sparse_torch,
    fusion_weights_dense,
)

__all__ = [
    "context_prediction_fusion",
    "fused_available",
    "fused_build_info",
    "fused_device_problem",
    "fused_unsupported_reason",
    "fusion_fused",
    "fusion_reference",
    "fusion_sparse_torch",
    "fusion_weights_dense",
]
