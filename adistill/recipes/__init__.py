"""Recipes: whole training procedures (config and data in, a `TenantModel` out), plain PyTorch."""

from adistill.recipes.train import TrainResult, train_tenant

__all__ = ["TrainResult", "train_tenant"]
