"""Bad input, case by case: each gets one line naming the culprit (file, row, parameter) and what to
do, or a counted warning; nothing already written is lost."""

import errno
import gzip
import io
import json
import os
import re
import zipfile
from pathlib import Path

import pytest

from nbutils import data, evaluation, files, gguf_port, models, paths, prompts, training

GOOD = [
    {"instruction": f"Name colour {i}.", "input": "", "output": f"Colour {i}."} for i in range(6)
]


@pytest.fixture(autouse=True)
def processed_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "PROCESSED_DIR", tmp_path / "processed")


def prepare(tokenizer, path, sequence_length=128, val_size=1, test_size=1):
    """Notebook 01's steps: load, validate, split."""
    rows, source = data.load_source("", str(path), tokenizer=tokenizer)
    kept, counts = data.validate(
        rows, tokenizer, prompts.Template("gemma", "<eos>"), sequence_length, source["source"]
    )
    return data.split(kept, val_size, test_size, 0)[0], counts


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


DATA_FILES = {
    "empty file": ("e.json", b"  \n", r"e.json: the file is empty"),
    "invalid JSON": ("bad.json", b'[{"instruction": "x",', r"bad.json line 1: not valid JSON"),
    "broken JSONL line": (
        "bad.jsonl",
        b'{"instruction": "a", "output": "b"}\n{oops}\n',
        r"bad.jsonl line 2: not valid JSON",
    ),
    "top-level object": (
        "obj.json",
        json.dumps({"instruction": "a", "output": "b"}, indent=1).encode(),
        r"obj.json: the file is one JSON object, not a list",
    ),
    "rows under a key": (
        "wrapped.json",
        json.dumps({"data": GOOD}).encode(),
        r"wrapped.json: the rows are under the key 'data'",
    ),
    "missing columns": (
        "cols.json",
        json.dumps([{"question": "a", "answer": "b"}]).encode(),
        r"no row has the field 'instruction'",
    ),
    "all outputs empty": (
        "empty_out.json",
        json.dumps([{**r, "output": " "} for r in GOOD]).encode(),
        r"no usable rows left after validation \(\{'empty_output': 6\}\)",
    ),
    "only duplicates": (
        "dups.json",
        json.dumps([GOOD[0]] * 5).encode(),
        r"dups.json: 1 usable row\(s\) remain after validation \(\{'duplicate': 4\}\), but VAL_SIZE=1 "
        r"and TEST_SIZE=1 need 3",
    ),
    "every row too long": (
        "long.json",
        json.dumps([{**r, "output": "word " * 300} for r in GOOD]).encode(),
        r"all 6 rows are longer than SEQUENCE_LENGTH=128 tokens.*raise SEQUENCE_LENGTH",
    ),
    "Latin-1 bytes": (
        "latin.json",
        '[{"instruction": "café", "output": "x"}]'.encode("latin-1"),
        r"latin.json: not UTF-8 text \(byte 0xe9 at offset 21\).*iconv",
    ),
    "UTF-16 text": (
        "u16.json",
        json.dumps(GOOD).encode("utf-16"),
        r"u16.json: UTF-16 text, not UTF-8.*`iconv -f utf-16 -t utf-8`",
    ),
    "binary file": (
        "blob.json",
        bytes(range(256)) * 4,
        r"blob.json: a binary file \(NUL bytes in the first 8 KB\), not text; expected a UTF-8 "
        r"Alpaca/Dolly JSON or JSONL file, or a CSV/TSV file",
    ),
    "too few rows for three splits": (
        "two.json",
        json.dumps(GOOD[:2]).encode(),
        r"two.json: 2 usable row\(s\) remain after validation \(none dropped\), but VAL_SIZE=1 and "
        r"TEST_SIZE=1 need 3 \(train, val and test each non-empty\)",
    ),
    "CSV without the columns": (
        "t.csv",
        b"q,a\nx,y\n",
        r"t.csv: column\(s\) \['instruction', 'output'\] not in the header",
    ),
}


@pytest.mark.parametrize("case", DATA_FILES)
def test_bad_data_files(tokenizer, tmp_path, case):
    name, content, pattern = DATA_FILES[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(data.DataError, match=pattern) as err:
        prepare(tokenizer, tmp_path / name)
    one_line(err)


def test_split_error_names_the_file_and_why_rows_were_dropped(tokenizer, tmp_path):
    """Too few rows left for the split: the message names the file and the drop counts by reason,
    like the 'no usable rows' error, including the rows that a TEST_PATH file took."""
    rows = [GOOD[0], GOOD[0], {**GOOD[1], "output": " "}, {**GOOD[2], "output": ""}]
    rows += [{"instruction": "x"}, {"instruction": 3, "output": "y"}]
    (tmp_path / "mostly_dropped.json").write_text(json.dumps(rows))
    expected = (
        f"{tmp_path / 'mostly_dropped.json'}: 1 usable row(s) remain after validation "
        "({'duplicate': 1, 'empty_output': 2, 'missing_output': 1, 'instruction_not_a_string': 1}), "
        "but VAL_SIZE=1 and TEST_SIZE=1 need 3"
    )
    with pytest.raises(data.DataError, match=re.escape(expected)) as err:
        prepare(tokenizer, tmp_path / "mostly_dropped.json")
    one_line(err)

    (tmp_path / "rows.json").write_text(json.dumps(GOOD[:4]))
    rows, source = data.load_source("", str(tmp_path / "rows.json"))
    kept, _ = data.validate(
        rows, tokenizer, prompts.Template("gemma", "<eos>"), 128, source["source"]
    )
    with pytest.raises(
        data.DataError,
        match=r"rows.json: 1 usable row\(s\) remain after validation \(\{'also_in_TEST_PATH': 3\}\), "
        r"but VAL_SIZE=1 and TEST_SIZE=0 need 2 \(train and val each non-empty\)",
    ) as err:
        data.split(kept, 1, 0, 0, test_rows=kept[:3])
    one_line(err)


def zipped(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name,content,kind",
    [
        (
            "nul.jsonl",
            b'{"instruction": "a",\0\0\0 "output": "b"}\n',
            "NUL bytes in the first 8 KB",
        ),
        ("rows.json", gzip.compress(json.dumps(GOOD).encode()), "gzip-compressed data"),
        ("rows.jsonl.gz", gzip.compress(json.dumps(GOOD).encode()), "gzip-compressed data"),
        ("rows.csv", zipped("rows.csv", b"instruction,output\na,b\n"), "zip archive"),
        ("rows.json", b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG image data"),
    ],
)
def test_binary_files_are_called_binary_without_the_encoding_hint(
    tokenizer, tmp_path, name, content, kind
):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(
        data.DataError,
        match=rf"{re.escape(name)}: a binary file \({kind}.*\), not text; expected a UTF-8 Alpaca/Dolly "
        r"JSON or JSONL file, or a CSV/TSV file",
    ) as err:
        prepare(tokenizer, tmp_path / name)
    message = one_line(err)
    assert "latin" not in message.lower() and "iconv" not in message


def test_non_string_and_empty_fields_are_dropped_and_counted(tokenizer, tmp_path):
    rows = GOOD + [
        {"instruction": "x", "output": 42},
        {"instruction": ["a"], "output": "y"},
        {"instruction": "z", "output": ""},
    ]
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    splits, counts = prepare(tokenizer, tmp_path / "mixed.json")
    assert (
        counts["output_not_a_string"] == 1
        and counts["instruction_not_a_string"] == 1
        and counts["empty_output"] == 1
    )
    assert sum(len(s) for s in splits.values()) == 6  # the good rows, all kept


def test_unknown_dataset_and_missing_or_unreadable_path(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match="DATASET='squad' is unknown") as err:
        data.load_source("squad", tokenizer=tokenizer)
    one_line(err)
    with pytest.raises(data.DataError, match=r"DATA_PATH=.*nope.json'.*no such file"):
        data.load_source("", str(tmp_path / "nope.json"))
    (tmp_path / "locked.json").write_text(json.dumps(GOOD))

    def denied(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    # tests run as root here, where chmod 000 would not stop a read
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(
        data.DataError,
        match=r"locked.json: cannot read it \(Permission denied\); check the path and its permissions",
    ) as err:
        data.load_source("", str(tmp_path / "locked.json"))
    one_line(err)


def test_grouped_split_that_would_leave_a_split_empty():
    rows = [{"id": str(i), "module": f"m{i % 2}"} for i in range(10)]
    with pytest.raises(
        data.DataError,
        match=r"the 10 rows come in 2 modules, kept whole per split, which leaves the train split empty",
    ):
        data.split_rows(rows, 1, 1, seed=0, group_key="module")


def test_sequence_length_below_the_template(tokenizer):
    with pytest.raises(
        data.DataError,
        match=r"SEQUENCE_LENGTH=20 is below the \d+ tokens the smallest example needs",
    ) as err:
        data.validate(GOOD, tokenizer, prompts.Template("gemma", "<eos>"), 20)
    one_line(err)


def test_corrupted_gguf(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + os.urandom(300))
    with pytest.raises(
        gguf_port.GGUFError, match=r"broken.gguf: not a readable GGUF file.*truncated or altered"
    ) as err:
        models.gguf_causal_lm(tmp_path / "broken.gguf")
    one_line(err)


@pytest.fixture()
def saved_adapter(tmp_path):
    lm = models.load_gemma("tiny", sequence_length=64)
    training.enable_lora(lm, 4, "all", 8)
    cfg = training.TrainConfig(rank=4, targets="all", alpha=8)
    spec = training.adapter_spec(cfg, "tiny", "gemma", 64, {"train": "t", "val": "v"})
    return training.save_adapter(lm, tmp_path / "a.lora.h5", spec)


def test_missing_adapter_file(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="missing.lora.h5 .*run notebooks/03_lora_finetune.ipynb first"
    ) as err:
        training.load_adapter(models.load_gemma("tiny"), tmp_path / "missing.lora.h5", "tiny")
    one_line(err)


@pytest.mark.parametrize(
    "change,pattern",
    [
        (
            {"model": "gemma3_1b"},
            r"adapter was trained on model='gemma3_1b', not 'tiny'; set MODEL to match",
        ),
        (
            {"rank": 8},
            r"it holds 14 layers of rank 4, its spec \(rank 8, targets 'all', DoRA False\) gives this model 14",
        ),
        (
            {"targets": "query,value"},
            r"it holds 14 layers of rank 4, its spec \(rank 4, targets 'query,value', DoRA False\) gives this model 4",
        ),
    ],
)
def test_adapter_of_another_model_rank_or_target_set(saved_adapter, change, pattern):
    path, spec_path = saved_adapter
    spec_path.write_text(json.dumps({**json.loads(spec_path.read_text()), **change}))
    with pytest.raises(ValueError, match=pattern) as err:
        training.load_adapter(models.load_gemma("tiny"), path, "tiny")
    one_line(err)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"rank": 0}, r"RANK=0 must be a positive integer"),
        ({"learning_rate": -1e-4}, r"LEARNING_RATE=-0.0001 must be a number in \(0, 1\)"),
        ({"learning_rate": float("nan")}, r"LEARNING_RATE=nan must be a number in \(0, 1\)"),
        ({"batch_size": 0}, r"BATCH_SIZE=0 must be a positive integer"),
        ({"warmup_steps": -5}, r"WARMUP_STEPS=-5 must be an integer >= 0"),
        ({"alpha": -1.0}, r"LORA_ALPHA=-1.0 must be a number >= 0"),
    ],
)
def test_bad_training_parameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        training.TrainConfig(**kwargs)
    one_line(err)


def test_rank_zero_through_keras_hub_enable_lora():
    """Notebook 03 calls keras-hub's enable_lora itself: rank 0 is caught right after, not as a
    ZeroDivisionError later."""
    lm = models.load_gemma("tiny")
    lm.backbone.enable_lora(rank=0, target_layer_names=training.lora_layer_names("query,value"))
    with pytest.raises(ValueError, match="RANK=0 must be a positive integer"):
        training.configure_lora(lm.backbone, alpha=8)


@pytest.mark.parametrize(
    "spec", ["beam:1", "beam:x", "beams", "top_k:abc", "top_k:0", "top_p:1.5", "greedy:3"]
)
def test_unknown_or_malformed_sampler(spec):
    with pytest.raises(
        ValueError,
        match=rf"SAMPLER='{spec}': use 'greedy', 'beam:<beams>' \(beams >= 2\), 'top_k:<k>' \(k >= 1\) or 'top_p:<p>'",
    ):
        evaluation.make_sampler(spec)


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_no_space_left_keeps_the_previous_artifacts(tmp_path, monkeypatch):
    real_replace = os.replace
    files.write_json(tmp_path / "metrics.json", {"rouge": 0.3})
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.gguf").write_bytes(b"previous")
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(
        OSError,
        match=r"cannot write .*metrics.json \(No space left on device\); its previous version, if any, is intact",
    ) as err:
        files.write_json(tmp_path / "metrics.json", {"rouge": 0.9})
    one_line(err)
    calls = []

    # the old folder is set aside, then moving the new one in fails
    def second_move_fails(src, dst):
        calls.append(dst)
        return real_replace(src, dst) if len(calls) == 1 else no_space()

    monkeypatch.setattr(os, "replace", second_move_fails)
    with pytest.raises(OSError, match=r"cannot write .*export \(No space left on device\)"):
        with files.atomic_dir(tmp_path / "export") as tmp:
            (tmp / "model.gguf").write_bytes(b"new")
    assert len(calls) == 2
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"rouge": 0.3}
    assert (tmp_path / "export" / "model.gguf").read_bytes() == b"previous"
    # no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "metrics.json"]


def test_a_split_written_without_its_manifest_is_detected(tokenizer, tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps(GOOD))
    splits, _ = prepare(tokenizer, tmp_path / "rows.json")
    lengths = ([10] * 6, [3] * 6)
    data.write_processed(
        "rows",
        splits,
        lengths,
        source={},
        seed=0,
        template="gemma",
        stop_token="<eos>",
        rows_read=6,
        drops={},
    )
    # the manifest write never came
    files.write_text(
        data.processed_dir("rows") / "train.jsonl", files.to_jsonl(splits["train"][:1])
    )
    with pytest.raises(
        data.DataError,
        match=r"train.jsonl does not match manifest.json \(a write was interrupted.*re-run notebooks/01_prepare_data.ipynb",
    ):
        data.load_processed("rows")
