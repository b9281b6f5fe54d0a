"""Load, validate, split and save instruction data (notebook 01).

Sources: the built-in ``pycode-summary`` task, Alpaca JSON/JSONL, Dolly JSONL, CSV/TSV with a column
mapping, or (online only) a Hugging Face / Kaggle dataset. Every row becomes
``{"id", "instruction", "input", "output"}`` (plus ``module`` for the built-in task). Structural
problems raise :class:`DataError` naming the file; row problems drop the row and count the reason.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from nbutils import paths, prompts

BUILTIN = "pycode-summary"
FORMATS = ("alpaca", "dolly", "csv", "tsv")
FIELDS = ("instruction", "input", "output")
DOLLY_FIELDS = {"instruction": "instruction", "input": "context", "output": "response"}
MIN_PROMPT_CONTENT_TOKENS = 16  # below this a truncated prompt carries too little to learn from


class DataError(ValueError):
    """A data file that cannot be used as a whole (the message names the file and the fix)."""


# ---------------------------------------------------------------- reading files


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def detect_format(path: Path, forced: str = "", records: list | None = None) -> str:
    """``alpaca``, ``dolly``, ``csv`` or ``tsv`` from DATA_FORMAT, the extension and the fields."""
    if forced:
        if forced not in FORMATS:
            raise DataError(f"DATA_FORMAT={forced!r} is not a known format; use one of {', '.join(FORMATS)}.")
        return forced
    ext = path.suffix.lower()
    if ext in (".csv", ".tsv"):
        return ext[1:]
    if ext not in (".json", ".jsonl"):
        raise DataError(f"{path}: cannot tell the format from extension {ext!r}; "
                        f"set DATA_FORMAT to one of {', '.join(FORMATS)}.")  # fmt: skip
    records = read_json_records(path) if records is None else records
    keys = set().union(*(r.keys() for r in records[:200] if isinstance(r, dict)))
    return "dolly" if {"response", "context"} & keys and "output" not in keys else "alpaca"


def read_json_records(path: Path) -> list:
    """Records of a JSON list or a JSON Lines file (errors name the line)."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected a JSON list of objects or JSON Lines.")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}); expected a JSON list of objects.") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {n}: not valid JSON ({exc.msg}); expected one JSON object per line (JSONL).") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: no rows found; expected a non-empty JSON list of objects or JSON Lines.")
    return records


def read_table(path: Path, fmt: str, columns: dict | None) -> list[dict]:
    """Rows of a CSV/TSV file, renamed by ``columns`` ({our field: their column})."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected a header row and data rows.")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
    mapping = {f: (columns or {}).get(f, f) for f in FIELDS}
    missing = [c for f, c in mapping.items() if f != "input" and c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not in the header {reader.fieldnames}; "
                        "set COLUMNS, e.g. {'instruction': 'question', 'output': 'answer'}.")  # fmt: skip
    rows = [{f: rec.get(c) for f, c in mapping.items() if c in rec} for rec in reader]
    if not rows:
        raise DataError(f"{path}: the header has no data rows below it.")
    return rows


def normalise_records(records: list, fmt: str, path: Path, categories: list[str] | None = None) -> list[dict]:
    """Map Alpaca/Dolly records to our fields (values kept as found; validation checks them)."""
    objects = [r for r in records if isinstance(r, dict)]
    if not objects:
        raise DataError(f"{path}: rows are not JSON objects; expected objects with instruction/output fields.")
    names = DOLLY_FIELDS if fmt == "dolly" else {f: f for f in FIELDS}
    seen = set().union(*(r.keys() for r in objects))
    for field in ("instruction", "output"):
        if names[field] not in seen:
            raise DataError(f"{path}: no row has the field {names[field]!r} (fields seen: {sorted(seen)}); "
                            f"expected {fmt} format, or set DATA_FORMAT.")  # fmt: skip
    rows = []
    for rec in records:
        if not isinstance(rec, dict):
            rows.append({"_bad": "not_an_object"})
            continue
        if categories and fmt == "dolly" and rec.get("category") not in categories:
            rows.append({"_bad": "category_filtered"})
            continue
        rows.append({f: rec[names[f]] for f in FIELDS if names[f] in rec})
    return rows


def load_file(path: str | Path, fmt: str = "", columns: dict | None = None,
              categories: list[str] | None = None) -> tuple[list[dict], dict]:  # fmt: skip
    """Rows of a user file plus ``{"source", "format", "sha256"}``; raises DataError for unusable files."""
    path = paths.resolve(path)
    if not path.is_file():
        raise DataError(f"DATA_PATH={str(path)!r}: no such file. Give a path to an Alpaca/Dolly JSON(L) or CSV/TSV file.")
    is_json = fmt in ("alpaca", "dolly") or (not fmt and path.suffix.lower() in (".json", ".jsonl"))
    records = read_json_records(path) if is_json else None  # parsed once, for detection and loading
    fmt = detect_format(path, fmt, records)
    if fmt in ("csv", "tsv"):
        rows = read_table(path, fmt, columns)
    else:
        rows = normalise_records(records if records is not None else read_json_records(path), fmt, path, categories)
    for n, row in enumerate(rows):
        row["id"] = f"{path.stem}:{n}"
    return rows, {"source": str(path), "format": fmt, "sha256": sha256_bytes(path.read_bytes())}


def load_online(name: str) -> tuple[list[dict], dict]:
    """Download a ``hf:owner/name`` or ``kaggle:owner/dataset`` data set once (needs network)."""
    from nbutils import models

    scheme, _, handle = name.partition(":")
    host = {"hf": "huggingface.co", "kaggle": "www.kaggle.com"}[scheme]
    if not models.reachable(host):
        raise DataError(
            f"DATASET={name!r} must be downloaded from {host}, which is unreachable here. Offline choices: "
            f"DATASET={BUILTIN!r} (built in), or DATA_PATH=<your Alpaca/Dolly JSON(L) or CSV/TSV file>."
        ) from None
    target = paths.cache_dir() / "datasets" / name.replace(":", "_").replace("/", "_")
    if scheme == "kaggle":
        import kagglehub

        folder = Path(kagglehub.dataset_download(handle))
    else:
        try:
            from huggingface_hub import snapshot_download  # only needed online
        except ImportError:
            raise DataError(f"DATASET={name!r} needs the huggingface_hub package: pip install huggingface_hub.") from None
        folder = Path(snapshot_download(handle, repo_type="dataset", local_dir=target))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".json", ".jsonl", ".csv", ".tsv"))
    if not files:
        raise DataError(f"DATASET={name!r}: the download at {folder} has no JSON/JSONL/CSV/TSV file.")
    rows, info = load_file(files[0])
    info["source"] = f"{name} ({files[0].name})"
    info["sha256_of_file"] = models.sha256_file(files[0])
    return rows, info


# ---------------------------------------------------------------- validation


def row_problem(row: dict) -> str | None:
    """Why a row cannot be used (missing/non-string field, empty output), or None."""
    if "_bad" in row:
        return row["_bad"]
    for field in ("instruction", "output"):
        if row.get(field) is None:
            return f"missing_{field}"
    for field in FIELDS:
        value = row.get(field)
        if value is not None and not isinstance(value, str):
            return f"{field}_not_a_string"
    if not row["output"].strip():
        return "empty_output"
    if not row["instruction"].strip():
        return "empty_instruction"
    return None


def fit_to_length(row: dict, tokenizer, template, sequence_length: int) -> tuple[dict | None, bool]:
    """Truncate the prompt side (input, then instruction) so the row fits; never the response."""
    prompt_ids, target_ids = prompts.encode_example(tokenizer, row, template)
    if len(prompt_ids) + len(target_ids) <= sequence_length:
        return row, False
    row = dict(row)
    for field in ("input", "instruction"):
        while row.get(field) and len(prompt_ids) + len(target_ids) > sequence_length:
            ids = prompts.tokenize_batch(tokenizer, [row[field]])[0]
            overflow = len(prompt_ids) + len(target_ids) - sequence_length
            keep = len(ids) - max(overflow, 1)
            if field == "instruction" and keep < MIN_PROMPT_CONTENT_TOKENS:
                return None, False
            row[field] = tokenizer.detokenize(ids[: max(keep, 0)]) if keep > 0 else ""
            prompt_ids, _ = prompts.encode_example(tokenizer, row, template)
    if len(prompt_ids) + len(target_ids) > sequence_length:
        return None, False
    return row, True


def validate(rows: list[dict], tokenizer, template, sequence_length: int) -> tuple[list[dict], collections.Counter]:
    """Keep usable rows (truncating prompts where needed); count every dropped or truncated row."""
    counts: collections.Counter = collections.Counter()
    usable, seen = [], set()
    for row in rows:
        problem = row_problem(row)
        key = (row.get("instruction"), row.get("input") or "", row.get("output"))
        if problem is None and key in seen:
            problem = "duplicate"
        if problem:
            counts[problem] += 1
            continue
        seen.add(key)
        usable.append({**row, "input": row.get("input") or ""})
    kept = []
    for row, p_len, t_len in zip(usable, *token_lengths(usable, tokenizer, template)):
        truncated = p_len + t_len > sequence_length
        if truncated:
            row, truncated = fit_to_length(row, tokenizer, template, sequence_length)
            if row is None:
                counts["too_long"] += 1
                continue
        counts["truncated_prompt (kept)"] += truncated
        kept.append({**row, "truncated": truncated})
    return kept, counts


def counts_table(counts: dict, total: int) -> str:
    """Drop/truncation counts as an aligned text table."""
    lines = [f"{'reason':<28}{'rows':>7}{'share':>8}"]
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"{reason:<28}{n:>7}{n / max(total, 1):>8.1%}")
    return "\n".join(lines + [f"{'rows read':<28}{total:>7}"])


# ---------------------------------------------------------------- splits


def stable_hash(text: str, seed: int) -> int:
    """A hash that is the same on every machine and Python run."""
    return int(hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()[:15], 16)


def split_sizes(n: int, val_size: float, test_size: float) -> tuple[int, int]:
    """Val and test counts from fractions (< 1) or counts (>= 1)."""
    as_count = lambda s: int(round(s * n)) if s < 1 else int(s)  # noqa: E731
    n_val, n_test = as_count(val_size), as_count(test_size)
    if n_val + n_test >= n:
        raise DataError(f"VAL_SIZE={val_size} and TEST_SIZE={test_size} leave no training rows out of {n}.")
    return n_val, n_test


def split_rows(rows: list[dict], val_size: float, test_size: float, seed: int,
               group_key: str | None = None) -> dict[str, list[dict]]:  # fmt: skip
    """Seeded train/val/test split; with ``group_key`` whole groups stay in one split."""
    n_val, n_test = split_sizes(len(rows), val_size, test_size)
    if group_key is None:
        order = np.random.default_rng(seed).permutation(len(rows))
        shuffled = [rows[i] for i in order]
        return {"test": shuffled[:n_test], "val": shuffled[n_test : n_test + n_val], "train": shuffled[n_test + n_val :]}
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[row[group_key]].append(row)
    splits: dict[str, list[dict]] = {"test": [], "val": [], "train": []}
    for name in sorted(groups, key=lambda g: stable_hash(g, seed)):
        target = "test" if len(splits["test"]) < n_test else "val" if len(splits["val"]) < n_val else "train"
        splits[target].extend(groups[name])
    return splits


def cap_splits(splits: dict[str, list[dict]], caps: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Seeded subsample of each split to at most ``caps[name]`` rows (0 = no cap)."""
    out = {}
    for name, rows in splits.items():
        cap = caps.get(name) or 0
        if cap and len(rows) > cap:
            keep = sorted(np.random.default_rng(seed + 1).choice(len(rows), cap, replace=False))
            rows = [rows[i] for i in keep]
        out[name] = rows
    return out


# ---------------------------------------------------------------- writing


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def to_jsonl(rows: list[dict]) -> str:
    """JSON Lines text with stable key order."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file we wrote."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def percentiles(values: list[int]) -> dict:
    """p50/p90/p99/max of token lengths."""
    if not values:
        return {}
    arr = np.asarray(values)
    return {"p50": int(np.percentile(arr, 50)), "p90": int(np.percentile(arr, 90)),
            "p99": int(np.percentile(arr, 99)), "max": int(arr.max())}  # fmt: skip


def token_lengths(rows: list[dict], tokenizer, template) -> tuple[list[int], list[int]]:
    """Prompt (with <bos>) and target (with stop token) lengths of each row."""
    p = prompts.tokenize_batch(tokenizer, [prompts.render_prompt(r, template) for r in rows])
    t = prompts.tokenize_batch(tokenizer, [r["output"] for r in rows])
    return [len(x) + 1 for x in p], [len(x) + 1 for x in t]


def processed_dir(dataset: str) -> Path:
    """``data/processed/<dataset>`` under the repository root."""
    return paths.PROCESSED_DIR / dataset


def load_processed(dataset: str, notebook: str = "01_prepare_data") -> tuple[dict[str, list[dict]], dict]:
    """Splits and manifest written by notebook 01; a clear error if it has not run."""
    folder = processed_dir(dataset)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{manifest_path} not found: run notebooks/{notebook}.ipynb first "
                                f"(with DATASET/DATA_PATH giving {dataset!r}).")  # fmt: skip
    manifest = json.loads(manifest_path.read_text())
    return {s: read_jsonl(folder / f"{s}.jsonl") for s in ("train", "val", "test")}, manifest


# ---------------------------------------------------------------- notebook 01 in one call


def dataset_name(dataset: str, data_path: str) -> str:
    """Folder name under data/processed: the file's stem, or the DATASET name."""
    name = Path(data_path).stem if data_path else dataset
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def load_source(dataset: str, data_path: str, data_format: str, columns: dict | None,
                categories: list[str] | None, tokenizer, max_source_tokens: int) -> tuple[list[dict], dict]:  # fmt: skip
    """Rows and source info for DATA_PATH (if set) or DATASET."""
    if data_path:
        return load_file(data_path, data_format, columns, categories)
    if dataset == BUILTIN:
        from nbutils import pycode_task

        rows, info = pycode_task.mine_stdlib(tokenizer, max_source_tokens)
        return rows, {"source": BUILTIN, "format": "pycode", "sha256": sha256_bytes(to_jsonl(rows).encode()), **info}
    if dataset.split(":")[0] in ("hf", "kaggle"):
        return load_online(dataset)
    raise DataError(f"DATASET={dataset!r} is unknown: use {BUILTIN!r}, 'hf:<owner>/<name>', 'kaggle:<owner>/<dataset>', "
                    "or set DATA_PATH to a local file.")  # fmt: skip


def prepare(tokenizer, *, dataset: str = BUILTIN, data_path: str = "", data_format: str = "",
            columns: dict | None = None, categories: list[str] | None = None, test_path: str = "",
            template: str = "gemma", sequence_length: int = 256, val_size: float = 0.1,
            test_size: float = 0.1, max_train: int = 0, max_val: int = 0, max_test: int = 0,
            max_source_tokens: int = 192, seed: int = 0, model: str = "", stop_token: str = "auto") -> dict:  # fmt: skip
    """Load, validate, split and write ``data/processed/<name>/``; returns the manifest."""
    from nbutils import plots, provenance

    template = prompts.Template(template, prompts.auto_stop_token(template, model) if stop_token == "auto" else stop_token)
    if tokenizer.token_to_id(template.stop) in (None, int(tokenizer.token_to_id("<unk>"))):
        raise DataError(f"STOP_TOKEN={template.stop!r} is not a single token of {model or 'this'} tokenizer; use '<eos>'.")
    rows, source = load_source(dataset, data_path, data_format, columns, categories, tokenizer, max_source_tokens)
    kept, counts = validate(rows, tokenizer, template, sequence_length)
    if not kept:
        raise DataError(f"{source['source']}: no usable rows left after validation ({dict(counts)}).")
    if test_path:
        test_rows, test_source = load_file(test_path, data_format, columns, categories)
        test_rows, test_counts = validate(test_rows, tokenizer, template, sequence_length)
        test_keys = {(r["instruction"], r["input"]) for r in test_rows}
        train_val = [r for r in kept if (r["instruction"], r["input"]) not in test_keys]
        counts["also_in_TEST_PATH"] = len(kept) - len(train_val)
        splits = split_rows(train_val, val_size, 0, seed, "module" if dataset == BUILTIN and not data_path else None)
        splits["test"] = test_rows
        source["test_file"] = {**test_source, "counts": dict(test_counts)}
    else:
        group = "module" if not data_path and dataset == BUILTIN else None
        splits = split_rows(kept, val_size, test_size, seed, group)
    splits = cap_splits(splits, {"train": max_train, "val": max_val, "test": max_test}, seed)

    name = dataset_name(dataset, data_path)
    out = processed_dir(name)
    all_rows = [r for s in ("train", "val", "test") for r in splits[s]]
    p_len, t_len = token_lengths(all_rows, tokenizer, template)
    truncated_share = float(np.mean([r["truncated"] for r in all_rows]))
    plots.token_length_histogram(p_len, t_len, sequence_length, truncated_share, out / "token_lengths.png")
    manifest = {
        "dataset": name, "source": source, "template": template.style, "stop_token": template.stop,
        "model_for_tokenizer": model, "seed": seed,
        "params": {"sequence_length": sequence_length, "val_size": val_size, "test_size": test_size,
                   "max_train": max_train, "max_val": max_val, "max_test": max_test, "data_format": data_format,
                   "columns": columns, "categories": categories, "test_path": test_path,
                   "max_source_tokens": max_source_tokens},
        "rows_read": len(rows), "drops": dict(sorted(counts.items())),
        "counts": {s: len(splits[s]) for s in ("train", "val", "test")},
        "token_lengths": {"prompt": percentiles(p_len), "target": percentiles(t_len),
                          "total": percentiles([a + b for a, b in zip(p_len, t_len)])},
        "truncated_share": round(truncated_share, 4),
        "split_sha256": {}, "versions": provenance.versions(),
    }  # fmt: skip
    if dataset == BUILTIN and not data_path:
        manifest["modules_per_split"] = {s: sorted({r["module"] for r in splits[s]}) for s in splits}
    for split in ("train", "val", "test"):
        text = to_jsonl(splits[split])
        manifest["split_sha256"][split] = sha256_bytes(text.encode())
        write_atomic(out / f"{split}.jsonl", text)
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True))
    return manifest
