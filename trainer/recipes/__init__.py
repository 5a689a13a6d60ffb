"""The recipes by name. A new recipe is a ``Recipe`` subclass in this package, added to ``RECIPES``."""

from __future__ import annotations

import torch

from infra.config import ConfigError, JobConfig
from trainer.recipes.base import Recipe
from trainer.recipes.rectified_flow import RectifiedFlowRecipe
from trainer.recipes.scd import SCDRecipe

RECIPES: dict[str, type[Recipe]] = {cls.name: cls for cls in (RectifiedFlowRecipe, SCDRecipe)}


def recipe_class(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise ConfigError(f"recipe={name!r} is not a recipe; the recipes are {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def build_recipe(name: str, cfg: JobConfig, empty_condition: dict[str, torch.Tensor]) -> Recipe:
    return recipe_class(name)(cfg, empty_condition)


__all__ = ["RECIPES", "Recipe", "build_recipe", "recipe_class"]
