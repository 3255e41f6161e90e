"""transformers' auto-class mappings the load paths are decided from (model_type -> class name)."""

from __future__ import annotations

from transformers.models.auto import modeling_auto

CAUSAL_LM = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
IMAGE_TEXT_TO_TEXT = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
# 5.x adds a wider multimodal-LM mapping (audio-text models too); absent in older releases.
MULTIMODAL_LM = getattr(modeling_auto, "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", {})
