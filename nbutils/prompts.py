"""The one prompt template shared by training, baseline, evaluation and generation.

An example is a dict with ``instruction``, ``input`` (may be empty) and ``output``. The model sees
``render_prompt(example)`` and learns to continue it with ``output`` followed by the template's stop
token, the same single token id that generation stops on (the token layout is
:mod:`nbutils.sequences`).

Which layout: Gemma's chat turns, with the turn markers of the model's family (``gemma``:
``<start_of_turn>``/``<end_of_turn>`` for Gemma 2 and 3, ``gemma4``: ``<|turn>``/``<turn|>``), for
base and instruction-tuned models alike; ``alpaca`` is the plain alternative (docs/results.md
compares the two on the base 270M).

Which stop token: the end-of-turn marker is what an instruction-tuned Gemma ends a turn with. The
*base* Gemma 3 270M never learned ``<end_of_turn>``: its embedding is one of ~6,400 near-identical
untrained rows (cosine 0.995 to ``<unused…>`` tokens, measured here), so greedy decoding after LoRA
picks a random member of that cluster instead of stopping. ``<eos>`` is a trained, distinct token in
every Gemma, so ``stop="auto"`` uses it for base models (tests/test_models.py checks the facts).
"""

from __future__ import annotations

import dataclasses
import re

STYLES = ("gemma", "gemma4", "alpaca")
TURNS = {"gemma": ("<start_of_turn>", "<end_of_turn>"), "gemma4": ("<|turn>", "<turn|>")}
INSTRUCT_TAGS = ("instruct", "_it", "-it")  # in keras-hub preset names and Hugging Face repo names
ALPACA_HEADER = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
)


def check_style(style: str) -> str:
    """Return ``style`` or raise a one-line error listing the accepted ones."""
    if style not in STYLES:
        raise ValueError(
            f"TEMPLATE={style!r} is not a template style; use 'auto' or one of {', '.join(STYLES)}."
        )
    return style


def instruction_tuned(model: str) -> bool:
    """Whether ``model`` (a preset name, handle or folder) names an instruction-tuned Gemma: by its
    last path part (a handle's variation, not its version), never by the folders above."""
    parts = [p for p in model.lower().split("/") if p and not p.isdigit()]
    return any(tag in (parts or [""])[-1] for tag in INSTRUCT_TAGS)


def is_gemma4(name: str) -> bool:
    """Whether a preset name, handle, folder or class name is of the Gemma 4 family
    (``gemma4_2b``, ``Gemma4Backbone``, ``hf://google/gemma-4-E2B-it``)."""
    return "gemma4" in re.sub(r"[-_ ]", "", name.lower())


def auto_style(model: str, tokenizer=None) -> str:
    """The chat style of ``model``'s family: ``gemma4`` when its tokenizer (else its name) has
    Gemma 4's turn markers, else ``gemma``."""
    if tokenizer is not None:
        return "gemma4" if single_token(tokenizer, TURNS["gemma4"][0]) else "gemma"
    return "gemma4" if is_gemma4(model) else "gemma"


def single_token(tokenizer, text: str) -> bool:
    """Whether ``text`` is one token of ``tokenizer`` (not ``<unk>``)."""
    token_id = tokenizer.token_to_id(text)
    return token_id is not None and int(token_id) != int(tokenizer.token_to_id("<unk>"))


def auto_stop_token(style: str, model: str = "") -> str:
    """The end-of-turn marker for a chat style on instruction-tuned models, else ``<eos>`` (see
    module docstring)."""
    check_style(style)
    return TURNS[style][1] if style in TURNS and instruction_tuned(model) else "<eos>"


@dataclasses.dataclass(frozen=True)
class Template:
    """A prompt style plus the stop token every target ends with and generation stops on."""

    style: str = "gemma"
    stop: str = ""  # empty: what STOP_TOKEN="auto" picks for a base model

    def __post_init__(self):
        object.__setattr__(self, "stop", self.stop or auto_stop_token(self.style))

    @classmethod
    def for_model(cls, style: str, model: str, stop: str = "auto", tokenizer=None) -> Template:
        """The template for ``model``: ``"auto"`` picks the style and the stop token by the rules
        above."""
        style = auto_style(model, tokenizer) if style == "auto" else style
        return cls(style, auto_stop_token(style, model) if stop == "auto" else stop)

    @classmethod
    def from_manifest(cls, manifest: dict, model: str = "") -> Template:
        """The template notebook 01 wrote into the data manifest, refused for a ``model`` that
        differs from 01's in being instruction-tuned (their templates differ)."""
        prepared = manifest.get("model_for_tokenizer", model)
        if model and instruction_tuned(model) != instruction_tuned(prepared):
            kinds = {True: "instruction-tuned", False: "base"}
            raise ValueError(
                f"notebook 01 prepared the data for MODEL={prepared!r} "
                f"({kinds[instruction_tuned(prepared)]}), not MODEL={model!r} "
                f"({kinds[instruction_tuned(model)]}); run notebook 01 again with MODEL={model!r}."
            )
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
    if style in TURNS:
        start, end = TURNS[style]
        return f"{start}user\n{user_text(example)}{end}\n{start}model\n"
    extra = (example.get("input") or "").strip("\n")
    if extra.strip():
        head = ALPACA_HEADER.format(ctx=", paired with an input that provides further context")
        return f"{head}### Instruction:\n{example['instruction'].strip()}\n\n### Input:\n{extra}\n\n### Response:\n"
    return f"{ALPACA_HEADER.format(ctx='')}### Instruction:\n{example['instruction'].strip()}\n\n### Response:\n"
