"""Length-bucketed batches for the fast training path: little padding, few static shapes, loss
positions only.

Rows are grouped by length so a batch is only as wide as its longest row, rounded up to a multiple
of ``WIDTH_STEP`` (XLA then compiles each width once). Each batch also lists the positions whose
next token is a response token, as many entries per row as the longest response of the whole data
set (rounded up to ``RESPONSE_STEP``), so the 262k-word LM head runs there only and every batch of a
width has one shape. The layout itself comes from :mod:`nbutils.sequences`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nbutils import sequences

WIDTH_STEP = 32
RESPONSE_STEP = 16


def round_up(n: int, step: int) -> int:
    """``n`` rounded up to a multiple of ``step``."""
    return -(-int(n) // step) * step


@dataclasses.dataclass(frozen=True)
class Batch:
    """Model inputs plus, per row, the scored positions, their next-token targets and 0/1
    weights."""

    token_ids: np.ndarray  # (B, W) int32
    padding_mask: np.ndarray  # (B, W) bool
    positions: np.ndarray  # (B, R) int32: position t is scored on token t + 1
    targets: np.ndarray  # (B, R) int32
    weights: np.ndarray  # (B, R) float32: 0 on padding entries and padding rows
    rows: np.ndarray  # (B,) index of each row in the arrays, -1 for padding rows

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(rows, width, scored positions per row)``: one compilation per distinct shape."""
        return (*self.token_ids.shape, self.positions.shape[1])

    def inputs(self) -> dict[str, np.ndarray]:
        """The arrays the jitted objective takes."""
        return {
            "token_ids": self.token_ids,
            "padding_mask": self.padding_mask,
            "positions": self.positions,
            "targets": self.targets,
            "weights": self.weights,
        }

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.padding_mask.sum())

    @property
    def useful_tokens(self) -> int:
        """Response tokens scored by the loss."""
        return int(self.weights.sum())


def scored_entries(arrays: dict[str, np.ndarray]) -> int:
    """Scored entries per row that hold every row's response: its longest, rounded up to
    ``RESPONSE_STEP``."""
    return round_up(
        sequences.loss_positions(arrays["response_mask"]).sum(1).max(initial=1), RESPONSE_STEP
    )


def make_batch(
    arrays: dict[str, np.ndarray], idx: np.ndarray, n_rows: int | None = None, scored: int = 0
) -> Batch:
    """The rows ``idx`` of :func:`sequences.make_arrays` output as a bucketed batch of ``n_rows``
    rows (extra rows repeat the last one with zero weight, so the last evaluation batch keeps its
    shape) and ``scored`` entries per row (0: what these rows need; see :func:`scored_entries`)."""
    idx = np.asarray(idx)
    real = len(idx)
    if n_rows and n_rows > real:
        idx = np.concatenate([idx, np.repeat(idx[-1:], n_rows - real)])
    full_width = arrays["token_ids"].shape[1]
    lengths = arrays["padding_mask"][idx].sum(1)
    width = min(round_up(lengths.max(), WIDTH_STEP), full_width)
    loss_at = sequences.loss_positions(arrays["response_mask"][idx, :width])
    per_row = loss_at.sum(1)
    # a row scores at most width - 1
    r = min(scored or round_up(per_row.max(), RESPONSE_STEP), width - 1)
    if per_row.max() > r:
        raise ValueError(
            f"a row has {per_row.max()} response tokens, more than scored={r} entries."
        )
    positions = np.zeros((len(idx), r), np.int32)
    weights = np.zeros((len(idx), r), np.float32)
    for i, row in enumerate(loss_at):
        where = np.flatnonzero(row)
        positions[i, : len(where)] = where
        weights[i, : len(where)] = 1.0 if i < real else 0.0
    ids = arrays["token_ids"][idx, :width]
    targets = np.take_along_axis(ids, positions + 1, axis=1) * (weights > 0)
    row_index = np.where(np.arange(len(idx)) < real, idx, -1)
    return Batch(
        ids,
        arrays["padding_mask"][idx, :width],
        positions,
        targets.astype(np.int32),
        weights,
        row_index,
    )


def rows_per_step(rows: int, width: int, max_tokens: int) -> int:
    """Rows per step of a ``rows`` × ``width`` batch under a ``max_tokens`` budget (0: all rows in
    one step)."""
    fit = max(1, max_tokens // width) if max_tokens else rows
    # the largest divisor of ``rows`` that fits: every step of a batch has the same shape (one
    # compilation)
    return max((d for d in range(1, rows + 1) if rows % d == 0 and d <= fit), default=rows)


def largest_step(rows: int, max_length: int, max_tokens: int) -> tuple[int, int]:
    """``(rows, width)`` of the step with the most tokens that batches of ``rows`` rows up to
    ``max_length`` tokens make under ``max_tokens`` (a narrower batch may run more rows per step
    than the widest)."""
    widths = [
        min(w, max_length)
        for w in range(WIDTH_STEP, round_up(max_length, WIDTH_STEP) + 1, WIDTH_STEP)
    ]
    steps = [(rows_per_step(rows, w, max_tokens), w) for w in widths]
    return max(steps, key=lambda s: (s[0] * s[1], s[1]))


def split_batch(batch: Batch, max_tokens: int) -> list[Batch]:
    """``batch`` as equal groups of consecutive rows of at most ``max_tokens`` tokens (0: whole), at
    least one row each."""
    rows, width, _ = batch.shape
    per_piece = rows_per_step(rows, width, max_tokens)
    if per_piece >= rows:
        return [batch]
    fields = [f.name for f in dataclasses.fields(Batch)]
    return [
        Batch(**{f: getattr(batch, f)[i : i + per_piece] for f in fields})
        for i in range(0, rows, per_piece)
    ]


def epoch_batches(
    arrays: dict[str, np.ndarray], batch_size: int, seed: int, epoch: int
) -> list[Batch]:
    """One pass over the rows: shuffled by ``(seed, epoch)``, grouped by width, batches in shuffled
    order.

    The last ``len % batch_size`` rows of the shuffled order are left out of this pass (a different
    few each epoch), as with ``drop_remainder``.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(arrays["token_ids"])
    order = rng.permutation(n)[: n - n % batch_size]
    widths = np.array([round_up(x, WIDTH_STEP) for x in arrays["padding_mask"].sum(1)])
    # same-width rows together, shuffled within
    order = order[np.argsort(widths[order], kind="stable")]
    scored = scored_entries(arrays)
    batches = [
        make_batch(arrays, order[i : i + batch_size], scored=scored)
        for i in range(0, len(order), batch_size)
    ]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[Batch]:
    """Every row once, grouped by length; the last batch is padded with zero-weight rows."""
    order, scored = np.argsort(arrays["padding_mask"].sum(1), kind="stable"), scored_entries(arrays)
    return [
        make_batch(arrays, order[i : i + batch_size], batch_size, scored)
        for i in range(0, len(order), batch_size)
    ]
