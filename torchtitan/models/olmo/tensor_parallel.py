"""OLMo 1 tensor/sequence parallel plan: the Llama 3 plan as is.

The module names are Llama's, and the non-parametric LayerNorms run under
SequenceParallel exactly like RMSNorm does (there is simply no weight to
replicate). clip_qkv clamps element-wise, so it commutes with the head split.
"""
from torchtitan.models.llama3.tensor_parallel import apply_tp

__all__ = ["apply_tp"]
