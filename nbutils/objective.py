"""The objective: next-token cross-entropy at the scored (response) positions only.

Training (:class:`nbutils.training.Trainer`) and the teacher-forced evaluation loss
(:func:`nbutils.evaluation.response_losses`) both call :func:`scored_nll`, so they cannot disagree.
"""

from __future__ import annotations


def scored_nll(backbone, trainable: list, non_trainable: list, inputs: dict):
    """Cross-entropy ``(rows, scored)`` of each scored position's next token, computed statelessly.

    ``inputs`` holds ``token_ids``/``padding_mask`` ``(rows, width)`` and ``positions``/``targets``
    ``(rows, scored)`` (see :class:`nbutils.batches.Batch`). The 262k-word output layer (the tied
    embedding in reverse, with the model's own final soft-cap) runs only at ``positions``.
    """
    import keras

    mapping = list(zip(backbone.trainable_variables, trainable)) + list(zip(backbone.non_trainable_variables, non_trainable))
    with keras.StatelessScope(state_mapping=mapping):
        hidden = backbone({"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]})
        picked = keras.ops.take_along_axis(hidden, inputs["positions"][..., None], axis=1)
        logits = backbone.token_embedding(picked, reverse=True)
    return keras.ops.sparse_categorical_crossentropy(inputs["targets"], keras.ops.cast(logits, "float32"), from_logits=True)


def variable_values(backbone) -> tuple[list, list]:
    """Current values of the backbone's trainable and non-trainable variables."""
    return [v.value for v in backbone.trainable_variables], [v.value for v in backbone.non_trainable_variables]
