"""No pickle, no remote code, Keras' safe mode: the code paths that load files never execute what
they read."""

import re

import pytest

from nbutils import paths

FORBIDDEN = {
    r"\bimport pickle\b|\bpickle\.load": "pickle executes code while loading",
    r"allow_pickle\s*=\s*True": "numpy's allow_pickle executes code while loading",
    r"trust_remote_code\s*=\s*True": "remote code",
    r"safe_mode\s*=\s*False": "Keras' unsafe loading (lambdas in configs)",
    r"\btorch\.load\(": "torch.load unpickles",
    r"(?<![\w.])eval\(|(?<![\w.])exec\(": "eval/exec of text",
}
SOURCES = sorted(
    [
        *paths.REPO_ROOT.glob("nbutils/*.py"),
        *paths.REPO_ROOT.glob("notebooks/*.py"),
        *paths.REPO_ROOT.glob("bench/*.py"),
    ]
)


@pytest.mark.parametrize("pattern,why", FORBIDDEN.items())
def test_no_unsafe_loading_in_the_code(pattern, why):
    hits = [
        f"{p.relative_to(paths.REPO_ROOT)}:{i}"
        for p in SOURCES
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(pattern, line)
    ]
    assert not hits, f"{why}: {hits}"


def test_the_scan_finds_what_it_looks_for():
    lines = [
        "import pickle",
        "np.load(f, allow_pickle=True)",
        "AutoModel.from_pretrained(p, trust_remote_code=True)",
        "keras.saving.load_model(p, safe_mode=False)",
        "torch.load(path)",
        "eval(text)",
    ]
    assert all(re.search(pattern, line) for pattern, line in zip(FORBIDDEN, lines))
    assert not re.search(
        FORBIDDEN[r"(?<![\w.])eval\(|(?<![\w.])exec\("], "ast.literal_eval(text); model.eval()"
    )


def test_the_secret_scan_finds_a_planted_key(tmp_path):
    from test_kaggle import FAKE_KAGGLE_KEY, secret_leaks

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "clean.json").write_text("{}")
    (tmp_path / "a" / "b" / "weights.bin").write_bytes(
        b"\x00\x01" + FAKE_KAGGLE_KEY.encode() + b"\xff"
    )
    assert secret_leaks(tmp_path, [FAKE_KAGGLE_KEY]) == [str(tmp_path / "a" / "b" / "weights.bin")]
