"""Thought Cloning on BabyAI: data, model, training, evaluation."""

__version__ = "0.1.0"
