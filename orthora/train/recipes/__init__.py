"""Task recipes: what differs between GLUE, translation, extractive QA and summarization."""

from __future__ import annotations

from ..config import TrainConfig
from .base import EvalSet, TaskRecipe
from .glue import GlueRecipe
from .qa import QuestionAnsweringRecipe
from .seq2seq import SummarizationRecipe, TranslationRecipe

RECIPES: dict[str, type[TaskRecipe]] = {
    "glue": GlueRecipe,
    "translation": TranslationRecipe,
    "qa": QuestionAnsweringRecipe,
    "summarization": SummarizationRecipe,
}


def get_recipe(config: TrainConfig) -> TaskRecipe:
    """The recipe of ``config.task``; it fills the task's defaults into ``config`` and checks its task fields."""
    return RECIPES[config.task](config)


__all__ = ["RECIPES", "EvalSet", "TaskRecipe", "get_recipe"]
