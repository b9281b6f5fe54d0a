"""Shared helpers for the Gemma LoRA notebook series.

Importing the package is cheap: it only makes JAX the default Keras backend
(users may still override ``KERAS_BACKEND`` before importing) and imports
nothing heavy. Import the submodules you need, e.g. ``from nbutils import models``.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

__all__ = ["data", "evaluation", "models", "paths", "pipeline", "plots", "prompts", "training"]
