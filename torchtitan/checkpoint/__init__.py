"""Checkpoints: DCP step folders with completion markers (io), the training-time manager, and the formats
other tools use (formats/: Hugging Face safetensors, Meta's consolidated .pth, OLMo trainer checkpoints)."""
from torchtitan.checkpoint.io import ModelInfo
from torchtitan.checkpoint.manager import STATE_KEYS, CheckpointManager, ModelWrapper
from torchtitan.tools.errors import CheckpointError

__all__ = ["STATE_KEYS", "CheckpointError", "CheckpointManager", "ModelInfo", "ModelWrapper"]
