"""Shared helpers for the Gemma LoRA notebook series.

Importing the package is cheap: it only makes JAX the default Keras backend (users may still
override ``KERAS_BACKEND`` before importing), quiets TensorFlow's start-up logging, and imports
nothing heavy. Import the submodules you need, e.g. ``from nbutils import models``.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
# TensorFlow only tokenizes here; hide its CUDA/oneDNN chatter
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__all__ = ["data", "evaluation", "models", "paths", "pipeline", "plots", "prompts", "training"]
