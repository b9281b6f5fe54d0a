"""Batched decoding with left-padded prompts (nbutils.decoding) against keras-hub's own generate
function.

The checks live in ``_decoding_checks.py`` so that the Kaggle image's stack (keras-hub 0.26, another
cache layout for Gemma 3) runs them too.
"""

import json
import subprocess

import _decoding_checks as checks
import pytest
from conftest import IMAGE_PYTHON

from nbutils import decoding, evaluation, paths


@pytest.fixture(scope="module", params=["gemma3", "gemma4", "gemma2"])
def lm(request):
    """A tiny random model of each family (Gemma 3: 6 layers, so one uses global attention)."""
    return checks.tiny_model(request.param)


@pytest.mark.parametrize("check", checks.CHECKS, ids=lambda c: c.__name__)
def test_decoding(lm, check):
    """Left-padded batches decode keras-hub's tokens, stop early, and sample as keras-hub does (see
    the checks)."""
    check(lm)


def test_cache_layout_and_forward_match_call_with_cache(lm):
    """keras-hub 0.32's Gemma 3 takes (key, value) pairs, Gemma 2 one stacked array, Gemma 4 one
    array in a call_with_cache that masks padding; the forward matches call_with_cache."""
    import keras_hub

    expected = {
        keras_hub.models.Gemma3CausalLM: "pairs",
        keras_hub.models.Gemma4CausalLM: "model",
    }.get(type(lm), "stacked")
    assert checks.check_forward(lm) == expected, (
        "keras-hub changed its cache layout: see compat.cache_layout"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not IMAGE_PYTHON.exists(),
    reason="`make test-all` builds .venv-kaggle-image (the Kaggle image's stack)",
)
def test_decoding_on_the_kaggle_image_stack():
    """The same checks with keras-hub 0.26, whose Gemma 3 keeps its cache as one stacked array (Gemma
    2's layout is the same in both versions: the pinned stack checks it)."""
    script = paths.REPO_ROOT / "tests" / "_decoding_checks.py"
    done = subprocess.run(
        [str(IMAGE_PYTHON), str(script)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"gemma3": "stacked"}


def test_decoder_refuses_what_it_cannot_decode(lm):
    """Clear errors: an end off the chunk grid, too many prompts, a prompt longer than the end."""
    with pytest.raises(ValueError, match="multiple of 32"):
        decoding.make_decoder(lm, evaluation.make_sampler("greedy"), 2, 40, 4, [1])
    decode = decoding.make_decoder(lm, evaluation.make_sampler("greedy"), 2, 32, 4, [1])
    with pytest.raises(ValueError, match="1 to 2 prompts"):
        decode([[2, 5]] * 3)
    with pytest.raises(ValueError, match="33 tokens does not end by position 32"):
        decode([[2] * 33])
    with pytest.raises(ValueError, match="max_target_tokens >= 5"):
        decode([[2, 5]], [[7] * 5])


def test_decoders_of_one_kind_share_their_compiled_steps(lm):
    """A second decoder with the same shapes and sampler settings compiles nothing; any other
    setting gets its own steps (the checks above decode with several on one model)."""
    compiled = lambda: len(vars(lm).get("_nbutils_decoder_steps", {}))
    greedy = evaluation.make_sampler
    decoding.make_decoder(lm, greedy("greedy"), 2, 32, 4, [1])
    before = compiled()
    decoding.make_decoder(lm, greedy("greedy"), 2, 32, 4, [1])
    assert compiled() == before
    decoding.make_decoder(lm, greedy("greedy"), 2, 32, 4, [1], min_new_tokens=1)
    decoding.make_decoder(lm, greedy("top_k:5", 3), 2, 32, 4, [1])
    decoding.make_decoder(lm, greedy("greedy"), 1, 32, 4, [1])  # batch size
    decoding.make_decoder(lm, greedy("greedy"), 2, 64, 4, [1])  # prompt end
    decoding.make_decoder(lm, greedy("greedy"), 2, 32, 4, [1], max_target_tokens=33)  # cache
    assert compiled() == before + 5
