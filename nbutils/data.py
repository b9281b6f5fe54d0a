"""Load, validate, split and save instruction data (notebook 01).

Sources: the built-in ``pycode-summary`` task, Alpaca JSON/JSONL, Dolly JSONL, CSV/TSV with a column
mapping, or (online only) a Hugging Face / Kaggle dataset. Every row becomes
``{"id", "instruction", "input", "output"}`` (plus ``module`` for the built-in task). Structural
problems raise :class:`DataError` naming the file; row problems drop the row and count the reason.
"""

from __future__ import annotations

import collections
import csv
import io
import json
from pathlib import Path

import numpy as np

from nbutils import files, network, paths, provenance, pycode_task, sequences

BUILTIN = "pycode-summary"
FORMATS = ("alpaca", "dolly", "csv", "tsv")
FIELDS = ("instruction", "input", "output")
DOLLY_FIELDS = {"instruction": "instruction", "input": "context", "output": "response"}
SPLITS = ("train", "val", "test")
# rows that carry it (the built-in task) are split, and bootstrapped, by module
GROUP_KEY = "module"
MIN_PROMPT_CONTENT_TOKENS = 16  # below this a truncated prompt carries too little to learn from


class DataError(ValueError):
    """A data file that cannot be used as a whole (the message names the file and the fix)."""


class ValidRows(list):
    """:func:`validate`'s kept rows, carrying where they came from and the counts of the rows it
    dropped, so that the split's errors can name both."""

    where: str = ""
    drops: dict = {}


# ---------------------------------------------------------------- reading files


def detect_format(path: Path, forced: str = "", records: list | None = None) -> str:
    """``alpaca``, ``dolly``, ``csv`` or ``tsv`` from DATA_FORMAT, the extension and the fields."""
    if forced:
        if forced not in FORMATS:
            raise DataError(
                f"DATA_FORMAT={forced!r} is not a known format; use one of {', '.join(FORMATS)}."
            )
        return forced
    ext = path.suffix.lower()
    if ext in (".csv", ".tsv"):
        return ext[1:]
    if ext not in (".json", ".jsonl"):
        refuse_binary(path, read_head(path))  # e.g. rows.jsonl.gz: say it is compressed
        raise DataError(
            f"{path}: cannot tell the format from extension {ext!r}; "
            f"set DATA_FORMAT to one of {', '.join(FORMATS)}."
        )
    records = read_json_records(path) if records is None else records
    keys = set().union(*(r.keys() for r in records[:200] if isinstance(r, dict)))
    return "dolly" if {"response", "context"} & keys and "output" not in keys else "alpaca"


# leading bytes of binary formats a data file is sometimes mistaken for: (signature, name, what to do)
BINARY_SIGNATURES = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it first: gunzip"),
    (b"PK\x03\x04", "zip archive (or .xlsx/.docx)", "extract or export the data file from it"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first: unxz"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first: unzstd"),
    (b"7z\xbc\xaf\x27\x1c", "7-Zip archive", "extract the data file from it"),
    (b"PAR1", "Parquet", "export it to JSON Lines or CSV"),
    (b"SQLite format 3\x00", "SQLite database", "export the table to JSON Lines or CSV"),
    (b"\x89PNG\r\n\x1a\n", "PNG image", "check that the path names the data file"),
    (b"\xff\xd8\xff", "JPEG image", "check that the path names the data file"),
    (b"%PDF-", "PDF document", "check that the path names the data file"),
)
TEXT_FORMATS = "a UTF-8 Alpaca/Dolly JSON or JSONL file, or a CSV/TSV file"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def binary_kind(raw: bytes) -> tuple[str, str] | None:
    """``(what it is, what to do)`` when ``raw`` (a file's bytes, or its first 8 KB) is binary rather
    than text: a known signature, or a NUL byte in the first 8 KB that is not UTF-16 text."""
    for magic, kind, fix in BINARY_SIGNATURES:
        if raw.startswith(magic):
            return f"{kind} data", fix
    if b"\0" in raw[:8192] and not raw.startswith(UTF16_BOMS):
        return "NUL bytes in the first 8 KB", "check that the path names the data file"
    return None


def refuse_binary(path: Path, raw: bytes) -> None:
    """A one-line error, without the text-encoding hint, when ``raw`` is a binary file."""
    binary = binary_kind(raw)
    if binary:
        raise DataError(
            f"{path}: a binary file ({binary[0]}), not text; expected {TEXT_FORMATS} ({binary[1]})."
        )


def read_head(path: Path) -> bytes:
    """A file's first 8 KB (nothing when it cannot be read: reading it whole reports why)."""
    try:
        with open(path, "rb") as f:
            return f.read(8192)
    except OSError:
        return b""


def read_text(path: Path) -> str:
    """A data file's text, with one-line errors for an unreadable file, a binary file or non-UTF-8
    bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read it ({exc.strerror or exc}); check the path and its permissions."
        ) from None
    refuse_binary(path, raw)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if raw.startswith(UTF16_BOMS):
            what, encoding = "UTF-16 text, not UTF-8", "utf-16"
        else:
            what = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
            encoding = "latin1"
        raise DataError(
            f"{path}: {what}; give a UTF-8 JSON/JSONL/CSV/TSV file (convert e.g. with "
            f"`iconv -f {encoding} -t utf-8`)."
        ) from None


def read_json_records(path: Path) -> list:
    """Records of a JSON list or a JSON Lines file (errors name the line)."""
    text = read_text(path)
    if not text.strip():
        raise DataError(
            f"{path}: the file is empty; expected a JSON list of objects or JSON Lines."
        )
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {exc.lineno}: not valid JSON ({exc.msg}); expected a JSON list of objects."
            ) from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                _refuse_other_top_level(path, text)
                raise DataError(
                    f"{path} line {n}: not valid JSON ({exc.msg}); expected one JSON object per line (JSONL)."
                ) from None
        if len(records) == 1:
            _refuse_other_top_level(path, text)
    if not isinstance(records, list) or not records:
        raise DataError(
            f"{path}: no rows found; expected a non-empty JSON list of objects or JSON Lines."
        )
    return records


def _refuse_other_top_level(path: Path, text: str) -> None:
    """A one-line error when the whole file is one JSON value that holds the rows, or none, instead
    of being them."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    nested = (
        [k for k, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if isinstance(value, dict)
        else []
    )
    if nested:
        raise DataError(
            f"{path}: the rows are under the key {nested[0]!r} of a JSON object; save that list itself as the "
            "file (a JSON list of objects, or JSON Lines)."
        )
    if isinstance(value, dict) and "\n" in text.strip():
        raise DataError(
            f"{path}: the file is one JSON object, not a list of rows; expected a JSON list of objects or JSON Lines."
        )


def read_table(path: Path, fmt: str, columns: dict | None) -> list[dict]:
    """Rows of a CSV/TSV file, renamed by ``columns`` ({our field: their column})."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected a header row and data rows.")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
    mapping = {f: (columns or {}).get(f, f) for f in FIELDS}
    missing = [c for f, c in mapping.items() if f != "input" and c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(
            f"{path}: column(s) {missing} not in the header {reader.fieldnames}; "
            "set COLUMNS, e.g. {'instruction': 'question', 'output': 'answer'}."
        )
    rows = [{f: rec.get(c) for f, c in mapping.items() if c in rec} for rec in reader]
    if not rows:
        raise DataError(f"{path}: the header has no data rows below it.")
    return rows


def normalise_records(
    records: list, fmt: str, path: Path, categories: list[str] | None = None
) -> list[dict]:
    """Map Alpaca/Dolly records to our fields (values kept as found; validation checks them)."""
    objects = [r for r in records if isinstance(r, dict)]
    if not objects:
        raise DataError(
            f"{path}: rows are not JSON objects; expected objects with instruction/output fields."
        )
    names = DOLLY_FIELDS if fmt == "dolly" else {f: f for f in FIELDS}
    seen = set().union(*(r.keys() for r in objects))
    for field in ("instruction", "output"):
        if names[field] not in seen:
            raise DataError(
                f"{path}: no row has the field {names[field]!r} (fields seen: {sorted(seen)}); "
                f"expected {fmt} format, or set DATA_FORMAT."
            )
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


def load_file(
    path: str | Path,
    fmt: str = "",
    columns: dict | None = None,
    categories: list[str] | None = None,
) -> tuple[list[dict], dict]:
    """Rows of a user file plus ``{"source", "format", "sha256"}``; raises DataError for unusable
    files."""
    path = paths.resolve(path)
    if not path.is_file():
        raise DataError(
            f"DATA_PATH={str(path)!r}: no such file. Give a path to an Alpaca/Dolly JSON(L) or CSV/TSV file."
        )
    is_json = fmt in ("alpaca", "dolly") or (not fmt and path.suffix.lower() in (".json", ".jsonl"))
    records = read_json_records(path) if is_json else None  # parsed once, for detection and loading
    fmt = detect_format(path, fmt, records)
    if fmt in ("csv", "tsv"):
        rows = read_table(path, fmt, columns)
    else:
        rows = normalise_records(
            records if records is not None else read_json_records(path), fmt, path, categories
        )
    for n, row in enumerate(rows):
        row["id"] = f"{path.stem}:{n}"
    return rows, {"source": str(path), "format": fmt, "sha256": files.sha256_file(path)}


def load_online(name: str) -> tuple[list[dict], dict]:
    """Rows of a ``hf:owner/name`` (Hugging Face ``datasets``) or ``kaggle:owner/dataset`` data set
    (needs network, or on Kaggle the data set attached to the notebook)."""
    scheme, _, handle = name.partition(":")
    host = {"hf": "huggingface.co", "kaggle": "www.kaggle.com"}[scheme]
    if not (paths.ON_KAGGLE and scheme == "kaggle") and not network.reachable(host):
        raise DataError(
            f"DATASET={name!r} must be downloaded from {host}, which is unreachable here. Offline choices: "
            f"DATASET={BUILTIN!r} (built in), or DATA_PATH=<your Alpaca/Dolly JSON(L) or CSV/TSV file>; on Kaggle, "
            "attach a data set (Add Input) and use DATASET='kaggle:<owner>/<dataset>'."
        ) from None
    if scheme == "hf":
        return load_hub(name, handle)
    import kagglehub

    folder = Path(kagglehub.dataset_download(handle))
    found = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in (".json", ".jsonl", ".csv", ".tsv")
    )
    if not found:
        raise DataError(
            f"DATASET={name!r}: the download at {folder} has no JSON/JSONL/CSV/TSV file."
        )
    rows, info = load_file(found[0])
    info["source"] = f"{name} ({found[0].name})"
    return rows, info


def load_hub(name: str, handle: str) -> tuple[list[dict], dict]:
    """The ``train`` split of a Hugging Face hub data set in Alpaca or Dolly fields (parquet, JSON,
    …)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"DATASET={name!r} needs the `datasets` package: pip install datasets."
        ) from None
    try:
        records = datasets.load_dataset(handle, split="train").to_list()
    except Exception as exc:  # the hub's errors are many; the user needs the name and the reason
        raise DataError(
            f"DATASET={name!r}: the Hugging Face hub could not provide it "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})."
        ) from None
    label = Path(f"{handle}.jsonl")  # names the source in messages; the records decide the format
    fmt = detect_format(label, "", records)
    rows = normalise_records(records, fmt, label)
    for n, row in enumerate(rows):
        row["id"] = f"{handle}:{n}"
    return rows, {
        "source": name,
        "format": fmt,
        "sha256": files.sha256_bytes(files.to_jsonl(records).encode()),
    }


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
    prompt_ids, target_ids = sequences.encode_example(tokenizer, row, template)
    if len(prompt_ids) + len(target_ids) <= sequence_length:
        return row, False
    row = dict(row)
    for field in ("input", "instruction"):
        while row.get(field) and len(prompt_ids) + len(target_ids) > sequence_length:
            ids = sequences.tokenize_batch(tokenizer, [row[field]])[0]
            overflow = len(prompt_ids) + len(target_ids) - sequence_length
            keep = len(ids) - max(overflow, 1)
            if field == "instruction" and keep < MIN_PROMPT_CONTENT_TOKENS:
                return None, False
            row[field] = tokenizer.detokenize(ids[: max(keep, 0)]) if keep > 0 else ""
            prompt_ids, _ = sequences.encode_example(tokenizer, row, template)
    if len(prompt_ids) + len(target_ids) > sequence_length:
        return None, False
    return row, True


def validate(
    rows: list[dict], tokenizer, template, sequence_length: int, where: str = "the data"
) -> tuple[ValidRows, collections.Counter]:
    """Keep usable rows (truncating prompts where needed); count every dropped or truncated row.
    The kept rows carry ``where`` and the counts (see :class:`ValidRows`) for :func:`split`."""
    check_sequence_length(tokenizer, template, sequence_length)
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
    for row, p_len, t_len in zip(usable, *sequences.lengths(tokenizer, usable, template)):
        truncated = p_len + t_len > sequence_length
        if truncated:
            row, truncated = fit_to_length(row, tokenizer, template, sequence_length)
            if row is None:
                counts["too_long"] += 1
                continue
        counts["truncated_prompt (kept)"] += truncated
        kept.append({**row, "truncated": truncated})
    if not kept and counts["too_long"] and counts["too_long"] == sum(counts.values()):
        raise DataError(
            f"{where}: all {counts['too_long']} rows are longer than SEQUENCE_LENGTH={sequence_length} tokens, even "
            "with their prompt truncated; raise SEQUENCE_LENGTH (longer rows cost memory and time)."
        )
    if not kept:
        raise DataError(
            f"{where}: no usable rows left after validation {dropped(counts)}; see the reasons and fix the data."
        )
    kept = ValidRows(kept)
    kept.where, kept.drops = where, counts
    return kept, counts


def dropped(counts: dict) -> str:
    """The dropped rows' counts by reason, as the validation errors quote them:
    ``({'duplicate': 4})``, or ``(none dropped)``; truncated rows that were kept are left out."""
    drops = {k: v for k, v in counts.items() if v and not k.endswith("(kept)")}
    return f"({drops})" if drops else "(none dropped)"


def check_sequence_length(tokenizer, template, sequence_length: int) -> None:
    """Refuse a SEQUENCE_LENGTH too small for the template plus a minimal prompt and a one-token
    answer."""
    frame = (
        len(
            sequences.encode_example(
                tokenizer, {"instruction": "", "input": "", "output": ""}, template
            )[0]
        )
        + 1
    )
    needed = frame + MIN_PROMPT_CONTENT_TOKENS + 1
    if not isinstance(sequence_length, int) or sequence_length < needed:
        raise DataError(
            f"SEQUENCE_LENGTH={sequence_length!r} is below the {needed} tokens the smallest example needs "
            f"({frame} for the template and stop token, {MIN_PROMPT_CONTENT_TOKENS} of prompt, 1 of answer); "
            "use at least that, e.g. 256."
        )


def counts_table(counts: dict, total: int) -> str:
    """Drop/truncation counts as an aligned text table."""
    lines = [f"{'reason':<28}{'rows':>7}{'share':>8}"]
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        lines.append(f"{reason:<28}{n:>7}{n / max(total, 1):>8.1%}")
    return "\n".join(lines + [f"{'rows read':<28}{total:>7}"])


# ---------------------------------------------------------------- splits


def stable_hash(text: str, seed: int) -> int:
    """A hash that is the same on every machine and Python run."""
    return int(files.sha256_bytes(f"{seed}:{text}".encode())[:15], 16)


def split_sizes(
    n: int, val_size: float, test_size: float, where: str = "", drops: dict | None = None
) -> tuple[int, int]:
    """Val and test counts from fractions (< 1; at least one row when above 0) or counts (>= 1);
    errors name ``where`` the rows came from and, with ``drops``, why the others were dropped."""
    for name, size in (("VAL_SIZE", val_size), ("TEST_SIZE", test_size)):
        if not isinstance(size, (int, float)) or size < 0:
            raise DataError(
                f"{name}={size!r}: use a fraction below 1 (e.g. 0.1) or a row count (e.g. 50)."
            )
    as_count = lambda s: max(1, int(round(s * n))) if 0 < s < 1 else int(s)
    n_val, n_test = as_count(val_size), as_count(test_size)
    if n_val + n_test >= n:
        splits = "train, val and test" if n_test else "train and val"
        after = "after validation" if drops is None else f"after validation {dropped(drops)}"
        raise DataError(
            f"{where + ': ' if where else ''}{n} usable row(s) remain {after}, but VAL_SIZE={val_size} "
            f"and TEST_SIZE={test_size} need "
            f"{n_val + n_test + 1} ({splits} each non-empty); add rows or lower VAL_SIZE/TEST_SIZE."
        )
    return n_val, n_test


def split_rows(
    rows: list[dict],
    val_size: float,
    test_size: float,
    seed: int,
    group_key: str | None = None,
    where: str | None = None,
    drops: dict | None = None,
) -> dict[str, list[dict]]:
    """Seeded train/val/test split; with ``group_key`` whole groups stay in one split. Errors name
    ``where`` and ``drops`` (by default those that :func:`validate`'s rows carry)."""
    where = getattr(rows, "where", "") if where is None else where
    drops = getattr(rows, "drops", None) if drops is None else drops
    n_val, n_test = split_sizes(len(rows), val_size, test_size, where, drops)
    if group_key is None or not rows or group_key not in rows[0]:
        order = np.random.default_rng(seed).permutation(len(rows))
        shuffled = [rows[i] for i in order]
        return {
            "test": shuffled[:n_test],
            "val": shuffled[n_test : n_test + n_val],
            "train": shuffled[n_test + n_val :],
        }
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[row[group_key]].append(row)
    splits: dict[str, list[dict]] = {"test": [], "val": [], "train": []}
    for name in sorted(groups, key=lambda g: stable_hash(g, seed)):
        target = (
            "test"
            if len(splits["test"]) < n_test
            else "val"
            if len(splits["val"]) < n_val
            else "train"
        )
        splits[target].extend(groups[name])
    empty = [
        s
        for s, wanted in (("test", n_test), ("val", n_val), ("train", 1))
        if wanted and not splits[s]
    ]
    if empty:
        raise DataError(
            f"{where + ': ' if where else ''}the {len(rows)} rows come in {len(groups)} {group_key}s, "
            f"kept whole per split, which leaves the {'/'.join(empty)} split empty; add rows or lower "
            "VAL_SIZE/TEST_SIZE."
        )
    return splits


def cap_splits(
    splits: dict[str, list[dict]], caps: dict[str, int], seed: int
) -> dict[str, list[dict]]:
    """Seeded subsample of each split to at most ``caps[name]`` rows (0 = no cap)."""
    out = {}
    for name, rows in splits.items():
        cap = caps.get(name) or 0
        if cap and len(rows) > cap:
            keep = sorted(np.random.default_rng(seed + 1).choice(len(rows), cap, replace=False))
            rows = [rows[i] for i in keep]
        out[name] = rows
    return out


def split(
    rows: list[dict],
    val_size: float,
    test_size: float,
    seed: int,
    test_rows: list[dict] | None = None,
) -> tuple[dict[str, list[dict]], int]:
    """Train/val/test by seed (whole modules per split when rows carry ``module``), or train/val
    plus a separate test file whose prompts are removed from train/val; returns the splits and that
    count."""
    if test_rows is None:
        return split_rows(rows, val_size, test_size, seed, GROUP_KEY), 0
    test_keys = {(r["instruction"], r["input"]) for r in test_rows}
    rest = [r for r in rows if (r["instruction"], r["input"]) not in test_keys]
    drops = getattr(rows, "drops", None)
    if drops is not None and len(rest) < len(rows):
        drops = {**drops, "also_in_TEST_PATH": len(rows) - len(rest)}
    where = getattr(rows, "where", "")
    splits = split_rows(rest, val_size, 0, seed, GROUP_KEY, where, drops)
    return {**splits, "test": test_rows}, len(rows) - len(rest)


# ---------------------------------------------------------------- sources


def dataset_name(dataset: str, data_path: str) -> str:
    """Folder name under data/processed: the file's stem, or the DATASET name."""
    name = Path(data_path).stem if data_path else dataset
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def load_source(
    dataset: str,
    data_path: str = "",
    data_format: str = "",
    columns: dict | None = None,
    categories: list[str] | None = None,
    tokenizer=None,
    max_source_tokens: int = 192,
) -> tuple[list[dict], dict]:
    """Rows and source info for DATA_PATH (if set) or DATASET."""
    if data_path:
        return load_file(data_path, data_format, columns, categories)
    if dataset == BUILTIN:
        rows, info = pycode_task.mine_stdlib(tokenizer, max_source_tokens)
        return rows, {
            "source": BUILTIN,
            "format": "pycode",
            "sha256": files.sha256_bytes(files.to_jsonl(rows).encode()),
            **info,
        }
    if dataset.split(":")[0] in ("hf", "kaggle"):
        return load_online(dataset)
    raise DataError(
        f"DATASET={dataset!r} is unknown: use {BUILTIN!r}, 'hf:<owner>/<name>', 'kaggle:<owner>/<dataset>', "
        "or set DATA_PATH to a local file."
    )


def load_test_file(
    path: str,
    tokenizer,
    template,
    sequence_length: int,
    data_format: str = "",
    columns: dict | None = None,
    categories: list[str] | None = None,
) -> tuple[list[dict], dict]:
    """Rows of a separate TEST_PATH file, validated like the main data; returns rows and source
    info."""
    rows, info = load_file(path, data_format, columns, categories)
    kept, counts = validate(rows, tokenizer, template, sequence_length, f"TEST_PATH={path!r}")
    return kept, {**info, "counts": dict(counts)}


# ---------------------------------------------------------------- the processed folder


def bootstrap_groups(rows: list[dict]) -> list[str] | None:
    """Each row's module when every row has one (the cluster bootstrap resamples them), else
    None."""
    return [r[GROUP_KEY] for r in rows] if all(GROUP_KEY in r for r in rows) else None


def percentiles(values: list[int]) -> dict:
    """p50/p90/p99/max of token lengths."""
    if not values:
        return {}
    arr = np.asarray(values)
    return {
        "p50": int(np.percentile(arr, 50)),
        "p90": int(np.percentile(arr, 90)),
        "p99": int(np.percentile(arr, 99)),
        "max": int(arr.max()),
    }


def processed_dir(dataset: str) -> Path:
    """``data/processed/<dataset>`` under the repository root."""
    return paths.PROCESSED_DIR / dataset


def write_processed(
    name: str, splits: dict[str, list[dict]], lengths: tuple[list[int], list[int]], **facts
) -> dict:
    """Write ``{train,val,test}.jsonl`` and ``manifest.json`` (with ``facts``, split hashes and
    length percentiles) into ``data/processed/<name>/``, atomically; returns the manifest."""
    out = processed_dir(name)
    all_rows = [r for s in SPLITS for r in splits[s]]
    p_len, t_len = lengths
    manifest = {
        "dataset": name,
        **facts,
        "counts": {s: len(splits[s]) for s in SPLITS},
        "token_lengths": {
            "prompt": percentiles(p_len),
            "target": percentiles(t_len),
            "total": percentiles([a + b for a, b in zip(p_len, t_len)]),
        },
        "truncated_share": round(float(np.mean([r.get("truncated", False) for r in all_rows])), 4),
        "split_sha256": {},
        "versions": provenance.versions(),
    }
    if all(GROUP_KEY in r for r in all_rows):
        manifest["modules_per_split"] = {
            s: sorted({r[GROUP_KEY] for r in splits[s]}) for s in SPLITS
        }
    for s in SPLITS:
        text = files.to_jsonl(splits[s])
        manifest["split_sha256"][s] = files.sha256_bytes(text.encode())
        files.write_text(out / f"{s}.jsonl", text)
    files.write_json(out / "manifest.json", manifest)
    return manifest


def load_processed(
    dataset: str, notebook: str = "01_prepare_data"
) -> tuple[dict[str, list[dict]], dict]:
    """Splits and manifest written by notebook 01; a clear error if it has not run."""
    folder = processed_dir(dataset)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{manifest_path} not found: run notebooks/{notebook}.ipynb first "
            f"(with DATASET/DATA_PATH giving {dataset!r})."
        )
    manifest = files.read_json(manifest_path)
    # the splits are written before their manifest: a write cut short shows up here
    for s in SPLITS:
        if files.sha256_file(folder / f"{s}.jsonl") != manifest["split_sha256"][s]:
            raise DataError(
                f"{folder / f'{s}.jsonl'} does not match {manifest_path.name} (a write was interrupted or the "
                f"file edited); re-run notebooks/{notebook}.ipynb."
            )
    return {s: files.read_jsonl(folder / f"{s}.jsonl") for s in SPLITS}, manifest


def check_split_hashes(recorded: dict, manifest: dict, who: str) -> None:
    """Stop with a clear error when ``who`` used other splits than notebook 01 wrote last."""
    current = manifest["split_sha256"]
    changed = sorted(s for s in recorded if recorded[s] != current.get(s))
    if changed:
        raise DataError(
            f"the {'/'.join(changed)} split(s) changed since {who} ran (notebook 01 was re-run with other "
            f"settings); re-run {who} on the current data, or re-run 01 with the earlier settings."
        )
