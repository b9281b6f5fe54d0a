"""The token layout of one example, ``[<bos>] + prompt + response + [stop]``, and its arrays and
masks.

This module is the only place that lays tokens out: notebook 01's length checks, the training
arrays, the teacher-forced evaluation loss and the generation prompts all come from here.
"""

from __future__ import annotations

import numpy as np

from nbutils import prompts


def tokenize_batch(tokenizer, texts: list[str], chunk: int = 512) -> list[list[int]]:
    """Token ids (no <bos>) of many strings, tokenized in chunks."""
    out: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        ids = tokenizer(list(texts[i : i + chunk]))
        ids = ids.to_list() if hasattr(ids, "to_list") else ids
        out.extend([int(t) for t in row] for row in ids)
    return out


def bos_id(tokenizer) -> int:
    """Id of ``<bos>``, which starts every sequence."""
    return int(tokenizer.token_to_id("<bos>"))


def stop_token_id(tokenizer, template: prompts.Template | str) -> int:
    """Id of the template's stop token; a one-line error if the tokenizer has no such single
    token."""
    template = prompts.as_template(template)
    for marker in prompts.TURNS.get(template.style, ()):
        if not prompts.single_token(tokenizer, marker):
            raise ValueError(
                f"TEMPLATE={template.style!r} writes {marker}, which is not a single token of this "
                "model's tokenizer (another Gemma family); run notebook 01 with this MODEL and "
                "TEMPLATE='auto'."
            )
    if not prompts.single_token(tokenizer, template.stop):
        raise ValueError(
            f"STOP_TOKEN={template.stop!r} is not a single token of this tokenizer; use '<eos>'."
        )
    return int(tokenizer.token_to_id(template.stop))


def prompt_ids(tokenizer, rows: list[dict], template) -> list[list[int]]:
    """``<bos>`` + prompt ids of each row: what generation and training feed the model first."""
    bos = bos_id(tokenizer)
    return [
        [bos, *ids]
        for ids in tokenize_batch(tokenizer, [prompts.render_prompt(r, template) for r in rows])
    ]


def encode(tokenizer, rows: list[dict], template) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, target_ids)`` of each row: ``<bos>`` + prompt, and response + stop id."""
    stop = stop_token_id(tokenizer, template)
    targets = tokenize_batch(tokenizer, [r["output"] for r in rows])
    return [(p, [*t, stop]) for p, t in zip(prompt_ids(tokenizer, rows, template), targets)]


def encode_example(tokenizer, row: dict, template) -> tuple[list[int], list[int]]:
    """``(prompt_ids, target_ids)`` of one row."""
    return encode(tokenizer, [row], template)[0]


def lengths(tokenizer, rows: list[dict], template) -> tuple[list[int], list[int]]:
    """Prompt (with <bos>) and target (with stop token) lengths of each row."""
    pairs = encode(tokenizer, rows, template)
    return [len(p) for p, _ in pairs], [len(t) for _, t in pairs]


def check_fit(rows: list[dict], pairs: list[tuple], sequence_length: int) -> list[tuple]:
    """``pairs`` (see :func:`encode`) if each fits ``sequence_length`` tokens, else a one-line
    error naming the row."""
    for i, (row, (p, t)) in enumerate(zip(rows, pairs)):
        if len(p) + len(t) > sequence_length:
            raise ValueError(
                f"row {row.get('id', i)}: {len(p) + len(t)} tokens > SEQUENCE_LENGTH={sequence_length}; "
                "re-run notebook 01 with the same SEQUENCE_LENGTH."
            )
    return pairs


def make_arrays(
    tokenizer, rows: list[dict], template, sequence_length: int
) -> dict[str, np.ndarray]:
    """Token ids, padding mask and response mask of shape ``(rows, sequence_length)``.

    ``response_mask`` marks the response and stop tokens; the loss is taken at the positions
    *before* them (see :func:`loss_positions`).
    """
    pairs = check_fit(rows, encode(tokenizer, rows, template), sequence_length)
    ids = np.zeros((len(rows), sequence_length), np.int32)
    response = np.zeros((len(rows), sequence_length), bool)
    for i, (p, t) in enumerate(pairs):
        ids[i, : len(p) + len(t)] = p + t
        response[i, len(p) : len(p) + len(t)] = True
    return {"token_ids": ids, "padding_mask": ids != 0, "response_mask": response}


def loss_positions(response_mask: np.ndarray) -> np.ndarray:
    """Positions whose *next* token is a response token: where the model's prediction is scored."""
    return response_mask[..., 1:]
