"""The one prompt template shared by training, baseline, evaluation and generation.

An example is a dict with ``instruction``, ``input`` (may be empty) and ``output``. The model sees
``render_prompt(example)`` and learns to continue it with ``output`` followed by the style's stop
token, the same token generation stops on.
"""

from __future__ import annotations

STYLES = ("gemma", "alpaca")
STOP_TOKENS = {"gemma": "<end_of_turn>", "alpaca": "<eos>"}
ALPACA_HEADER = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
)


def check_style(style: str) -> str:
    """Return ``style`` or raise a one-line error listing the accepted ones."""
    if style not in STYLES:
        raise ValueError(f"TEMPLATE={style!r} is not a template style; use one of {', '.join(STYLES)}.")
    return style


def user_text(example: dict) -> str:
    """Instruction and optional input joined as the user's message."""
    instruction, extra = example["instruction"].strip(), (example.get("input") or "").strip("\n")
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def render_prompt(example: dict, style: str = "gemma") -> str:
    """The text the model is given; its answer starts right after it."""
    if check_style(style) == "gemma":
        return f"<start_of_turn>user\n{user_text(example)}<end_of_turn>\n<start_of_turn>model\n"
    extra = (example.get("input") or "").strip("\n")
    if extra.strip():
        head = ALPACA_HEADER.format(ctx=", paired with an input that provides further context")
        return f"{head}### Instruction:\n{example['instruction'].strip()}\n\n### Input:\n{extra}\n\n### Response:\n"
    return f"{ALPACA_HEADER.format(ctx='')}### Instruction:\n{example['instruction'].strip()}\n\n### Response:\n"


def stop_token(style: str = "gemma") -> str:
    """The token that ends every training target and stops generation."""
    return STOP_TOKENS[check_style(style)]


def stop_token_id(tokenizer, style: str = "gemma") -> int:
    """Id of the stop token in ``tokenizer`` (a single id, never its characters)."""
    return int(tokenizer.token_to_id(stop_token(style)))


def tokenize_batch(tokenizer, texts: list[str], chunk: int = 512) -> list[list[int]]:
    """Token ids (no <bos>) of many strings, tokenized in chunks."""
    out: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        ids = tokenizer(list(texts[i : i + chunk]))
        ids = ids.to_list() if hasattr(ids, "to_list") else ids
        out.extend([int(t) for t in row] for row in ids)
    return out


def encode_example(tokenizer, example: dict, style: str = "gemma") -> tuple[list[int], list[int]]:
    """``(prompt_ids, target_ids)``: <bos> + prompt, and response + stop id."""
    prompt, response = tokenize_batch(tokenizer, [render_prompt(example, style), example["output"]])
    bos = int(tokenizer.token_to_id("<bos>"))
    return [bos, *prompt], [*response, stop_token_id(tokenizer, style)]
