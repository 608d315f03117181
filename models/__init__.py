"""Keras models of the project: ViT and EfficientNet-Lite teachers and MobileViT / Mobile-Former /
EfficientFormer students, all registered by name (see `models.registry`)."""

from models.registry import ModelInfo, create_model, get_model_info, list_models, register_model

__all__ = ["ModelInfo", "create_model", "get_model_info", "list_models", "register_model"]
