"""The one prompt template shared by training, baseline, evaluation and generation.

An example is a dict with ``instruction``, ``input`` (may be empty) and ``output``. The model sees
``render_prompt(example)`` and learns to continue it with ``output`` followed by the template's stop
token, the same single token id that generation stops on (the token layout is
:mod:`nbutils.sequences`).

Which stop token: ``<end_of_turn>`` is what Gemma's chat format ends a turn with, and
instruction-tuned checkpoints know it. The *base* Gemma 3 270M never learned it: its embedding is
one of ~6,400 near-identical untrained rows (cosine 0.995 to ``<unused…>`` tokens, measured here),
so greedy decoding after LoRA picks a random member of that cluster instead of stopping. ``<eos>``
is a trained, distinct token in every Gemma, so ``stop="auto"`` (and a plain ``Template(style)``)
uses it for base models (tests/test_models.py checks the facts).
"""

from __future__ import annotations

import dataclasses

STYLES = ("gemma", "alpaca")
ALPACA_HEADER = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
)


def check_style(style: str) -> str:
    """Return ``style`` or raise a one-line error listing the accepted ones."""
    if style not in STYLES:
        raise ValueError(
            f"TEMPLATE={style!r} is not a template style; use one of {', '.join(STYLES)}."
        )
    return style


def auto_stop_token(style: str, model: str = "") -> str:
    """``<end_of_turn>`` for the gemma style on instruction-tuned models, else ``<eos>`` (see module
    docstring)."""
    check_style(style)
    tuned = any(tag in model for tag in ("instruct", "_it"))
    return "<end_of_turn>" if style == "gemma" and tuned else "<eos>"


@dataclasses.dataclass(frozen=True)
class Template:
    """A prompt style plus the stop token every target ends with and generation stops on."""

    style: str = "gemma"
    stop: str = ""  # empty: what STOP_TOKEN="auto" picks for a base model

    def __post_init__(self):
        object.__setattr__(self, "stop", self.stop or auto_stop_token(self.style))

    @classmethod
    def for_model(cls, style: str, model: str, stop: str = "auto") -> Template:
        """The template for ``model``: ``stop="auto"`` picks the stop token by the rule above."""
        return cls(style, auto_stop_token(style, model) if stop == "auto" else stop)

    @classmethod
    def from_manifest(cls, manifest: dict) -> Template:
        """The template notebook 01 wrote into the data manifest."""
        return cls(manifest["template"], manifest["stop_token"])


def as_template(template: Template | str) -> Template:
    """Accept a Template or a bare style name."""
    return template if isinstance(template, Template) else Template(template)


def user_text(example: dict) -> str:
    """Instruction and optional input joined as the user's message."""
    instruction, extra = example["instruction"].strip(), (example.get("input") or "").strip("\n")
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def render_prompt(example: dict, template: Template | str = "gemma") -> str:
    """The text the model is given; its answer starts right after it."""
    style = as_template(template).style
    if style == "gemma":
        return f"<start_of_turn>user\n{user_text(example)}<end_of_turn>\n<start_of_turn>model\n"
    extra = (example.get("input") or "").strip("\n")
    if extra.strip():
        head = ALPACA_HEADER.format(ctx=", paired with an input that provides further context")
        return f"{head}### Instruction:\n{example['instruction'].strip()}\n\n### Input:\n{extra}\n\n### Response:\n"
    return f"{ALPACA_HEADER.format(ctx='')}### Instruction:\n{example['instruction'].strip()}\n\n### Response:\n"
