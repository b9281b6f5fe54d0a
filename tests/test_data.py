"""Notebook 01's data layer: formats, bad input, validation, splits, determinism, template."""

import json
import socket

import pytest
from conftest import SHARED_ALPACA

from nbutils import data, files, models, network, paths, prompts, pycode_task, sequences

ROWS = [
    {"instruction": "Give a synonym.", "input": "happy", "output": "Glad."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello in French.", "output": "Bonjour."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Capital of Italy?", "input": "", "output": "Rome."},
    {"instruction": "Reverse the word.", "input": "stressed", "output": "desserts"},
]


@pytest.fixture(autouse=True)
def processed_in_tmp(tmp_path, monkeypatch):
    """Every test writes its processed data under tmp, never into the repository."""
    monkeypatch.setattr(paths, "PROCESSED_DIR", tmp_path / "processed")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def prepare(
    tok,
    path="",
    *,
    dataset="",
    data_format="",
    columns=None,
    categories=None,
    test_path="",
    template="gemma",
    stop_token="auto",
    model="",
    sequence_length=128,
    val_size=1,
    test_size=1,
    seed=0,
):
    """Notebook 01's steps in one call (load, validate, split, write), as the notebook runs them."""
    template = prompts.Template.for_model(template, model, stop_token)
    sequences.stop_token_id(tok, template)
    rows, source = data.load_source(dataset, str(path), data_format, columns, categories, tok)
    kept, drops = data.validate(rows, tok, template, sequence_length, source["source"])
    test_rows = None
    if test_path:
        test_rows, source["test_file"] = data.load_test_file(
            test_path, tok, template, sequence_length, data_format, columns, categories
        )
    splits, drops["also_in_TEST_PATH"] = data.split(kept, val_size, test_size, seed, test_rows)
    lengths = sequences.lengths(tok, [r for s in data.SPLITS for r in splits[s]], template)
    return data.write_processed(
        data.dataset_name(dataset, str(path)),
        splits,
        lengths,
        source=source,
        seed=seed,
        template=template.style,
        stop_token=template.stop,
        model_for_tokenizer=model,
        rows_read=len(rows),
        drops=dict(sorted(drops.items())),
    )


# ------------------------------------------------------------------ formats


def test_alpaca_json_list(tokenizer, tmp_path):
    m = prepare(tokenizer, write(tmp_path / "a.json", json.dumps(ROWS)))
    assert m["source"]["format"] == "alpaca" and m["rows_read"] == 6
    assert m["counts"] == {"train": 4, "val": 1, "test": 1}


def test_alpaca_jsonl(tokenizer, tmp_path):
    m = prepare(tokenizer, write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS)))
    assert m["source"]["format"] == "alpaca" and sum(m["counts"].values()) == 6


def test_dolly_jsonl_with_category_filter(tokenizer, tmp_path):
    dolly = [
        {
            "instruction": r["instruction"],
            "context": r.get("input", ""),
            "response": r["output"],
            "category": "closed_qa" if i % 2 else "brainstorming",
        }
        for i, r in enumerate(ROWS)
    ]
    path = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in dolly))
    m = prepare(tokenizer, path, categories=["closed_qa"], val_size=0, test_size=1)
    assert m["source"]["format"] == "dolly"
    assert m["drops"]["category_filtered"] == 3 and sum(m["counts"].values()) == 3
    rows = files.read_jsonl(data.processed_dir("d") / "train.jsonl")
    assert {r["output"] for r in rows} <= {"5", "Blue.", "desserts"}


@pytest.mark.parametrize("sep,ext", [(",", "csv"), ("\t", "tsv")])
def test_csv_tsv_with_column_mapping(tokenizer, tmp_path, sep, ext):
    lines = [sep.join(["question", "context", "answer"])]
    lines += [sep.join([r["instruction"], r.get("input", ""), r["output"]]) for r in ROWS]
    path = write(tmp_path / f"t.{ext}", "\n".join(lines) + "\n")
    m = prepare(
        tokenizer, path, columns={"instruction": "question", "input": "context", "output": "answer"}
    )
    assert m["source"]["format"] == ext and sum(m["counts"].values()) == 6


def test_shared_alpaca_file_loads_999_rows():
    if not SHARED_ALPACA.exists():
        pytest.skip(f"{SHARED_ALPACA} is not on this machine")
    rows, info = data.load_file(SHARED_ALPACA)
    assert len(rows) == 999 and info["format"] == "alpaca"
    assert all(data.row_problem(r) is None for r in rows)


# ------------------------------------------------------------------ bad input (structural)


@pytest.mark.parametrize(
    "name,text,pattern",
    [
        ("bad.json", '[{"instruction": "x",', r"bad.json line 1: not valid JSON"),
        (
            "bad.jsonl",
            '{"instruction": "a", "output": "b"}\n{oops}\n',
            r"bad.jsonl line 2: not valid JSON",
        ),
        ("empty.json", "  \n", r"empty.json: the file is empty"),
        ("none.json", "[]", r"none.json: no rows found"),
        (
            "nofield.json",
            json.dumps([{"instruction": "a", "answer": "b"}]),
            r"no row has the field 'output'",
        ),
        ("rows.txt", "hello", r"rows.txt: cannot tell the format.*DATA_FORMAT"),
        (
            "cols.csv",
            "q,a\nx,y\n",
            r"cols.csv: column\(s\) \['instruction', 'output'\] not in the header",
        ),
    ],
)
def test_structural_errors_name_the_file(tokenizer, tmp_path, name, text, pattern):
    with pytest.raises(data.DataError, match=pattern):
        prepare(tokenizer, write(tmp_path / name, text))


def test_missing_file_and_unknown_dataset(tokenizer, tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        prepare(tokenizer, tmp_path / "nope.json")
    with pytest.raises(data.DataError, match="DATASET='squad' is unknown"):
        prepare(tokenizer, dataset="squad")


def test_online_dataset_without_network_names_offline_choices(monkeypatch):
    def no_network(*a, **k):
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(data.DataError, match="pycode-summary.*DATA_PATH"):
        data.load_online("hf:tatsu-lab/alpaca")


def test_hub_dataset_read_with_the_datasets_library(monkeypatch, tokenizer):
    """hf:owner/name goes through `datasets.load_dataset` (parquet and all), then the Alpaca
    checks."""
    import datasets

    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(5)] + [
        {"instruction": "x", "input": "", "output": ""}
    ]
    asked = []
    monkeypatch.setattr(network, "reachable", lambda host, timeout=3.0: True)
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda h, split: asked.append((h, split)) or datasets.Dataset.from_list(records),
    )
    rows, info = data.load_online("hf:someone/alpaca-like")
    assert (
        asked == [("someone/alpaca-like", "train")]
        and info["format"] == "alpaca"
        and info["source"] == "hf:someone/alpaca-like"
    )
    assert [r["id"] for r in rows][:2] == [
        "someone/alpaca-like:0",
        "someone/alpaca-like:1",
    ] and len(rows) == 6
    kept, counts = data.validate(rows, tokenizer, "gemma", 64, "hf:someone/alpaca-like")
    # the empty output is dropped and counted, not silently
    assert len(kept) == 5 and sum(counts.values()) == 1

    def missing(h, split):
        raise FileNotFoundError(f"Dataset '{h}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(
        data.DataError, match="hf:someone/nothing.*could not provide it.*doesn't exist"
    ):
        data.load_online("hf:someone/nothing")


# ------------------------------------------------------------------ row-level validation


def test_row_problems_are_dropped_and_counted(tokenizer, tmp_path):
    rows = ROWS + [
        {"instruction": "no output"},
        {"instruction": 42, "output": "number instruction"},
        {"instruction": "empty output", "output": "   "},
        ROWS[0],
        {"instruction": "Too long", "output": "word " * 400},
        "not an object",
    ]
    m = prepare(tokenizer, write(tmp_path / "mixed.json", json.dumps(rows)))
    assert m["drops"] == {
        "duplicate": 1,
        "empty_output": 1,
        "instruction_not_a_string": 1,
        "missing_output": 1,
        "not_an_object": 1,
        "too_long": 1,
        "truncated_prompt (kept)": 0,
        "also_in_TEST_PATH": 0,
    }
    assert sum(m["counts"].values()) == 6


def test_truncation_cuts_prompt_never_response(tokenizer):
    row = {
        "instruction": "Summarize.",
        "input": "lorem ipsum dolor " * 200,
        "output": "A long text about lorem.",
    }
    fitted, truncated = data.fit_to_length(row, tokenizer, "gemma", 96)
    assert truncated and fitted["output"] == row["output"]
    p, t = sequences.encode_example(tokenizer, fitted, "gemma")
    assert len(p) + len(t) <= 96 and t[-1] == 1  # <eos>, the default stop token
    assert t[:-1] == sequences.tokenize_batch(tokenizer, [row["output"]])[0]
    # a response that alone overflows the budget drops the row instead of cutting it
    assert data.fit_to_length({**row, "output": "x " * 200}, tokenizer, "gemma", 96) == (
        None,
        False,
    )


# ------------------------------------------------------------------ splits and determinism


def test_same_seed_gives_byte_identical_outputs(tokenizer, tmp_path):
    rows = [
        {"instruction": f"Task {i}", "input": f"value {i * 7}", "output": f"Answer {i}."}
        for i in range(40)
    ]
    path = write(tmp_path / "det.json", json.dumps(rows))
    out = data.processed_dir("det")
    snapshots = []
    for _ in range(2):
        prepare(tokenizer, path, val_size=0.2, test_size=0.2, seed=3)
        snapshots.append(
            {
                f: (out / f).read_bytes()
                for f in ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json")
            }
        )
    assert snapshots[0] == snapshots[1]
    prepare(tokenizer, path, val_size=0.2, test_size=0.2, seed=4)
    assert (out / "test.jsonl").read_bytes() != snapshots[0]["test.jsonl"]


def test_grouped_split_keeps_modules_apart():
    rows = [{"id": str(i), "module": f"m{i % 13}"} for i in range(300)]
    splits = data.split_rows(rows, 0.15, 0.15, seed=0, group_key="module")
    modules = {s: {r["module"] for r in rs} for s, rs in splits.items()}
    assert not (
        modules["train"] & modules["test"]
        or modules["train"] & modules["val"]
        or modules["val"] & modules["test"]
    )
    assert sum(len(v) for v in splits.values()) == 300 and all(splits.values())


def test_test_path_replaces_the_test_split(tokenizer, tmp_path):
    main = write(tmp_path / "main.json", json.dumps(ROWS))
    held = write(
        tmp_path / "held.json", json.dumps([ROWS[0], {"instruction": "New task", "output": "New."}])
    )
    m = prepare(tokenizer, main, test_path=str(held), val_size=1)
    assert m["counts"]["test"] == 2 and m["drops"]["also_in_TEST_PATH"] == 1
    assert m["counts"]["train"] + m["counts"]["val"] == 5


def test_builtin_task_mines_the_stdlib(tokenizer):
    rows, info = pycode_task.mine_stdlib(tokenizer, max_source_tokens=192)
    assert (
        len(rows) > 2000
        and info["python_version"]
        and sum(info["per_module"].values()) == len(rows)
    )
    assert not any("/test" in r["id"] or r["id"].startswith(("test/", "idlelib/")) for r in rows)
    for r in rows[:200]:
        assert '"""' not in r["input"].split("\n", 2)[1] and 3 <= len(r["output"].split()) <= 30


def test_pycode_source_drops_docstring_and_dedents():
    import ast

    src = 'class A:\n    @property\n    def f(self):\n        """Return the thing.\n\n        More."""\n        return 1\n'
    node = ast.parse(src).body[0].body[0]
    assert (
        pycode_task.source_without_docstring(src.splitlines(keepends=True), node)
        == "@property\ndef f(self):\n    return 1"
    )
    assert (
        pycode_task.first_sentence("Return the thing. More words.\n\nDetails.")
        == "Return the thing."
    )


# ------------------------------------------------------------------ the template


@pytest.mark.parametrize(
    "template,stop_id",
    [("gemma", 1), ("alpaca", 1), (prompts.Template("gemma", "<end_of_turn>"), 106)],
)
def test_targets_end_with_the_single_stop_token(tokenizer, template, stop_id):
    for row in ROWS:
        p, t = sequences.encode_example(tokenizer, {**row, "input": row.get("input", "")}, template)
        style = prompts.as_template(template).style
        assert t[-1] == stop_id and stop_id not in t[:-1] and p[0] == 2
        assert prompts.render_prompt(row, style).endswith(
            "model\n" if style == "gemma" else "### Response:\n"
        )


def test_unknown_template_is_a_clear_error():
    with pytest.raises(ValueError, match="TEMPLATE='chatml'.*gemma, gemma4, alpaca"):
        prompts.render_prompt(ROWS[0], "chatml")


def test_stop_token_choice(tokenizer, tmp_path):
    assert (
        prompts.Template("gemma").stop
        == prompts.auto_stop_token("gemma", "gemma3_270m_local")
        == "<eos>"
    )
    assert prompts.Template.for_model("gemma", "gemma3_instruct_1b").stop == "<end_of_turn>"
    assert prompts.auto_stop_token("gemma", "gemma3_instruct_1b") == "<end_of_turn>"
    assert prompts.auto_stop_token("alpaca", "gemma3_instruct_1b") == "<eos>"
    path = write(tmp_path / "s.json", json.dumps(ROWS))
    m = prepare(tokenizer, path, model="gemma3_270m_local")
    assert m["stop_token"] == "<eos>" and prompts.Template.from_manifest(m).stop == "<eos>"
    m = prepare(tokenizer, path, stop_token="<end_of_turn>")
    assert m["stop_token"] == "<end_of_turn>"
    with pytest.raises(ValueError, match="STOP_TOKEN='<my stop>' is not a single token"):
        prepare(tokenizer, path, stop_token="<my stop>")


@pytest.mark.parametrize(
    ("model", "style", "stop"),
    [
        ("gemma3_270m_local", "gemma", "<eos>"),
        ("gemma3_instruct_1b", "gemma", "<end_of_turn>"),
        ("gemma2_instruct_2b_en", "gemma", "<end_of_turn>"),
        ("tiny-gemma4", "gemma4", "<eos>"),
        ("gemma4_2b", "gemma4", "<eos>"),
        ("gemma4_instruct_2b", "gemma4", "<turn|>"),
        ("kaggle://keras/gemma4/keras/gemma4_instruct_4b/2", "gemma4", "<turn|>"),
        ("hf://google/gemma-4-E2B-it", "gemma4", "<turn|>"),
        ("runs/split-it/export/keras", "gemma", "<eos>"),  # only the last part names the model
    ],
)
def test_auto_template_follows_the_model(model, style, stop):
    """TEMPLATE and STOP_TOKEN 'auto': the family's turn markers, end of turn for instruct only."""
    template = prompts.Template.for_model("auto", model)
    assert (template.style, template.stop) == (style, stop)
    start, end = prompts.TURNS[style]
    row = {"instruction": "Say hi.", "input": "", "output": "hi"}
    assert prompts.render_prompt(row, template) == f"{start}user\nSay hi.{end}\n{start}model\n"


def test_auto_style_reads_the_tokenizer(tokenizer):
    """A local folder's name says nothing: the tokenizer's turn markers decide."""
    gemma4 = models.tiny_gemma4_tokenizer()
    assert prompts.Template.for_model("auto", "/models/mine", tokenizer=gemma4).style == "gemma4"
    assert prompts.Template.for_model("auto", "/models/mine", tokenizer=tokenizer).style == "gemma"
    # a Gemma 3 template on a Gemma 4 tokenizer (and back) is refused, naming the marker
    with pytest.raises(ValueError, match="TEMPLATE='gemma' writes <start_of_turn>.*notebook 01"):
        sequences.stop_token_id(gemma4, prompts.Template("gemma"))
    with pytest.raises(ValueError, match="TEMPLATE='gemma4' writes <\\|turn>"):
        sequences.stop_token_id(tokenizer, prompts.Template("gemma4"))
    assert sequences.stop_token_id(gemma4, prompts.Template("gemma4", "<turn|>")) == int(
        gemma4.token_to_id("<turn|>")
    )


def test_manifest_template_refused_for_a_model_of_the_other_kind(tokenizer, tmp_path):
    """02-05 take 01's template only for a model that is instruction-tuned as 01's was."""
    path = write(tmp_path / "s.json", json.dumps(ROWS))
    m = prepare(tokenizer, path, model="gemma3_270m_local")
    assert prompts.Template.from_manifest(m, "gemma3_270m").stop == "<eos>"
    with pytest.raises(
        ValueError, match="prepared the data for MODEL='gemma3_270m_local' \\(base\\)"
    ):
        prompts.Template.from_manifest(m, "gemma3_instruct_1b")
