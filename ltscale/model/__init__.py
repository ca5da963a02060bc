"""LatentLM and its mechanisms. Imports torch/transformers only: never deepspeed (a test checks)."""

from ltscale.model.generation import GenerationOutput, generate_batched
from ltscale.model.latent_lm import MODES, LatentAdapter, LatentLM, LatentLMOutput

__all__ = ["MODES", "GenerationOutput", "LatentAdapter", "LatentLM", "LatentLMOutput", "generate_batched"]
