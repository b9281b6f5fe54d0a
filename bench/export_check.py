"""Check a run's exports in the tools people load them with (a script, not a test; not in CI).

    python bench/export_check.py RUN_ID [--prompts 8] [--new-tokens 24]

Needs ``transformers`` + ``torch`` for the safetensors export and ``llama-cpp-python`` for the GGUF;
each missing package skips its part, said so in the output. The reference is the run's merged
keras-hub preset (notebook 06 checked it against the trained model): logits on notebook 03's probe,
and greedy answers to the first test prompts. Writes ``runs/<RUN_ID>/export/external_checks.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import numpy as np

import nbutils  # noqa: F401  (KERAS_BACKEND=jax)
from nbutils import data, export, files, paths, prompts, quiet, runs, sequences


def valid_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """max |a - b| over the real (unpadded) positions."""
    return float(np.max(np.abs(a - b)[mask]))


def keras_reference(
    folder, probe: dict, prompt_ids: list[list[int]], new_tokens: int, stop: int
) -> tuple:
    """Logits on the probe and greedy continuations from the merged keras-hub preset."""
    import keras_hub

    lm = keras_hub.models.CausalLM.from_preset(str(folder))
    inputs = {"token_ids": probe["token_ids"], "padding_mask": probe["padding_mask"]}
    logits = export.logits(lm, export.hidden_states(lm, inputs))
    answers = []
    # greedy by hand: argmax of the last position, one token at a time (no sampler settings
    # involved)
    for ids in prompt_ids:
        out = list(ids)
        for _ in range(new_tokens):
            x = np.array([out])
            nxt = int(
                export.logits(
                    lm, export.hidden_states(lm, {"token_ids": x, "padding_mask": x != 0})
                )[0, -1].argmax()
            )
            if nxt == stop:
                break
            out.append(nxt)
        answers.append(out[len(ids) :])
    return logits, answers


def transformers_check(
    folder, probe: dict, reference: np.ndarray, prompt_ids, answers, new_tokens: int, stop: int
) -> dict:
    """Logits and greedy answers of the safetensors export loaded by transformers (torch, fp32)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(probe["token_ids"], dtype=torch.long),
            attention_mask=torch.tensor(probe["padding_mask"], dtype=torch.long),
        ).logits.numpy()
        same = 0
        for ids, expected in zip(prompt_ids, answers):
            gen = model.generate(
                torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=stop
            )
            got = gen[0, len(ids) :].tolist()
            same += (got[: got.index(stop)] if stop in got else got) == expected
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "max_abs_logit_diff": valid_max_diff(reference, out, probe["padding_mask"]),
        "greedy_answers_identical": f"{same}/{len(answers)}",
    }


def llama_cpp_check(
    path, probe: dict, reference: np.ndarray, prompt_ids, answers, new_tokens: int, stop: int
) -> dict:
    """Logits (each probe row) and greedy answers of the GGUF export evaluated by llama.cpp
    (llama-cpp-python)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=512, n_threads=2, verbose=False
    )
    diffs, same = [], 0
    for row, mask, ref in zip(probe["token_ids"], probe["padding_mask"], reference):
        llm.reset()
        llm.eval(row[mask].tolist())
        got = np.array(llm.scores[: int(mask.sum())], dtype=np.float32)
        diffs.append(float(np.max(np.abs(got - ref[mask]))))
    for ids, expected in zip(prompt_ids, answers):
        llm.reset()
        llm.eval(list(ids))
        out = []
        for _ in range(new_tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if nxt == stop:
                break
            out.append(nxt)
            llm.eval([nxt])
        same += out == expected
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "max_abs_logit_diff": max(diffs),
        "greedy_answers_identical": f"{same}/{len(answers)}",
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument(
        "--prompts", type=int, default=8, help="test prompts answered greedily by both sides"
    )
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    quiet.load_frameworks()
    out = paths.RUNS_DIR / args.run_id
    folder, spec = out / "export", runs.read_step_output(args.run_id, "03_lora_finetune")
    probe = export.load_probe(out / export.PROBE_FILE)
    template = prompts.Template(spec["template"], spec["stop_token"])
    splits, _ = data.load_processed(
        files.read_json(out / "config.json")["parameters"].get("DATASET", "pycode-summary")
    )
    import keras_hub

    tokenizer = keras_hub.models.CausalLM.from_preset(str(folder / "keras")).preprocessor.tokenizer
    prompt_ids = sequences.prompt_ids(tokenizer, splits["test"][: args.prompts], template)
    stop = sequences.stop_token_id(tokenizer, template)
    reference, answers = keras_reference(folder / "keras", probe, prompt_ids, args.new_tokens, stop)
    result = {
        "run_id": args.run_id,
        "probe_shape": list(probe["token_ids"].shape),
        "prompts": len(prompt_ids),
    }
    for name, package, check in (
        (
            "transformers",
            "transformers",
            lambda: transformers_check(
                folder / "transformers",
                probe,
                reference,
                prompt_ids,
                answers,
                args.new_tokens,
                stop,
            ),
        ),
        (
            "llama_cpp",
            "llama_cpp",
            lambda: llama_cpp_check(
                folder / "model.gguf", probe, reference, prompt_ids, answers, args.new_tokens, stop
            ),
        ),
    ):
        if importlib.util.find_spec(package) is None:
            result[name] = {"skipped": f"{package} is not installed"}
        else:
            result[name] = check()
        print(f"{name}: {json.dumps(result[name])}", flush=True)
    files.write_json(folder / "external_checks.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
