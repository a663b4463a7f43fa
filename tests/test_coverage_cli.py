"""`lightning-opd align` and `measure_coverage` on real (packaged) tokenizers.

The command runs in-process through `cli.main`, so fixture tokenizers are built once per test
session (fixtures.py caches them in memory) and each call only wraps a copy.
"""

from __future__ import annotations

import json

import pytest

from lightning_opd.align import ALIGNERS, TokenizerPair
from lightning_opd.cli import main
from lightning_opd.cli.align import KEYS, measure_coverage
from lightning_opd.fixtures import load_fixture_tokenizer

TEXTS = [
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 9",
    "12 ÷ 4 = 3 and it’s 😀 日本語 12345\n",
    "def f(x):\n    return x ** 2\n",
    "",
]
TYPES = {"aligner": str, "texts": int, "student_tokens": int, "supervised_tokens": int,
         "coverage": float, "teacher_vocab_reached": (float, type(None)), "rows": int, "spans": int,
         "seconds": float}  # fmt: skip


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps({"answer": t, "other": t.upper()}) + "\n" for t in TEXTS))
    return path


def align(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["align", *args])
    out, err = capsys.readouterr()
    return code, out, err


def align_json(capsys, *args: str) -> dict[str, dict]:
    code, out, err = align(capsys, *args, "--json")
    assert code == 0, err
    return {r["aligner"]: r for r in json.loads(out)}


def test_json_output_has_exactly_the_documented_keys_and_types(capsys, jsonl):
    names = sorted(ALIGNERS)
    results = align_json(capsys, "--student", "fixture:qwen2.5", "--teacher", "fixture:gpt2",
                         "--aligner", ",".join(names), str(jsonl))  # fmt: skip
    assert list(results) == names
    for r in results.values():
        assert tuple(r) == KEYS
        assert all(isinstance(r[k], t) for k, t in TYPES.items()), r
        assert r["texts"] == len(TEXTS)
        assert 0 <= r["supervised_tokens"] <= r["student_tokens"]
        assert r["coverage"] == pytest.approx(r["supervised_tokens"] / r["student_tokens"])
        assert 0 <= r["spans"] <= r["rows"] and r["seconds"] >= 0
    assert results["exact"]["coverage"] < 1.0  # the tokenizers cut digits differently
    assert results["exact"]["spans"] == 0
    # |V∩| / |V_T| for every V∩ aligner; all of it for uld (sorted lists); None for alm
    pair = TokenizerPair.build(load_fixture_tokenizer("qwen2.5"), load_fixture_tokenizer("gpt2"))
    shared = len(pair.vocab) / len(pair.teacher_bytes.table)
    assert 0.5 < shared < 1  # most of gpt2's ids are also qwen2.5 ids, not all
    for name in ("exact", "simct", "simct_1to1", "random_span"):
        assert results[name]["teacher_vocab_reached"] == pytest.approx(shared)
    assert results["uld"]["teacher_vocab_reached"] == 1.0
    assert results["alm"]["teacher_vocab_reached"] is None


def test_identical_tokenizers_give_full_coverage_for_exact(capsys, jsonl):
    results = align_json(capsys, "--student", "fixture:gpt2", "--teacher", "fixture:gpt2",
                         "--aligner", "exact", str(jsonl))  # fmt: skip
    gpt2 = load_fixture_tokenizer("gpt2")
    expected_tokens = sum(len(gpt2(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS)
    assert results["exact"]["coverage"] == 1.0
    assert results["exact"]["student_tokens"] == expected_tokens  # EOS counted per text
    assert results["exact"]["rows"] == expected_tokens and results["exact"]["spans"] == 0
    assert results["exact"]["teacher_vocab_reached"] == 1.0


def test_tokenizer_json_and_directory_specs(capsys, jsonl, tmp_path):
    load_fixture_tokenizer("gpt2").save_pretrained(tmp_path / "gpt2")
    results = align_json(capsys, "--student", str(tmp_path / "gpt2" / "tokenizer.json"),
                         "--teacher", str(tmp_path / "gpt2"), str(jsonl))  # fmt: skip
    assert results["exact"]["coverage"] == 1.0


def test_field_option_and_table_output(capsys, jsonl):
    code, out, err = align(capsys, "--student", "fixture:gpt2", "--teacher", "fixture:gpt2",
                           "--field", "other", str(jsonl))  # fmt: skip
    assert code == 0, err
    assert "exact" in out and "coverage" in out and "1.0000" in out
    code, out, err = align(capsys, "--student", "fixture:gpt2", "--teacher", "fixture:gpt2",
                           "--aligner", "exact,alm", str(jsonl))  # fmt: skip
    assert code == 0, err
    assert "teacher_vocab_reached" in out
    cells = {line.split("│")[1].strip(): line.split("│")[6].strip() for line in out.splitlines()
             if line.count("│") > 6 and line.split("│")[1].strip() in ("exact", "alm")}  # fmt: skip
    assert cells == {"exact": "1.0000", "alm": "—"}  # alm compares no distributions: a dash


@pytest.mark.parametrize("case", ["bad_fixture", "missing_tokenizer_file", "corrupt_tokenizer_file",
                                  "missing_file", "missing_field", "bad_json", "not_utf8", "unknown_aligner"])  # fmt: skip
def test_bad_inputs_exit_2_with_one_line(capsys, jsonl, tmp_path, case):
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text("{ not a tokenizer")
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('{"answer": "ok"}\nnot json\n')
    student, teacher, file, extra = "fixture:gpt2", "fixture:gpt2", str(jsonl), []
    if case == "bad_fixture":
        student = "fixture:nope"
    elif case == "missing_tokenizer_file":
        teacher = str(tmp_path / "absent" / "tokenizer.json")
    elif case == "corrupt_tokenizer_file":
        teacher = str(corrupt)
    elif case == "missing_file":
        file = str(tmp_path / "absent.jsonl")
    elif case == "missing_field":
        extra = ["--field", "nope"]
    elif case == "bad_json":
        file = str(bad_lines)
    elif case == "not_utf8":
        file = str(tmp_path / "latin1.jsonl")
        (tmp_path / "latin1.jsonl").write_bytes('{"answer": "ok"}\n{"answer": "Ça"}\n'.encode("latin-1"))
    elif case == "unknown_aligner":
        extra = ["--aligner", "exact,nope"]
    code, out, err = align(capsys, "--student", student, "--teacher", teacher, *extra, file)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightning-opd align: "), err
    assert "Traceback" not in err
    if case == "not_utf8":  # file, line and the 1-based character column of the first bad byte
        column = len('{"answer": "') + 1
        assert f"latin1.jsonl:2: not valid UTF-8 at column {column} " in lines[0]
    if case == "bad_json":
        assert "bad.jsonl:2: bad JSON at column 1 (Expecting value)" in lines[0]


def test_measure_coverage_library_call():
    gpt2 = load_fixture_tokenizer("gpt2")
    [exact] = measure_coverage(gpt2, gpt2, TEXTS, ["exact"], batch_size=2)
    assert exact["coverage"] == 1.0 and exact["texts"] == len(TEXTS)
    with pytest.raises(ValueError, match="unknown aligner"):
        measure_coverage(gpt2, gpt2, TEXTS, ["nope"])
