"""`lightning-opd bench` in a tiny setting: the JSON it writes, and a naive reference that does the
same work as the fast path (same segments), so the speed ratio compares like with like."""

from __future__ import annotations

import json

import pytest

from lightning_opd.align import TokenizerPair, segment_responses
from lightning_opd.cli import main
from lightning_opd.cli.bench import BenchSettings, fast_segments, naive_segments, run_bench
from tests.test_align_exact import byte_level_tokenizer


@pytest.fixture(scope="module")
def hand_pair() -> TokenizerPair:
    student = byte_level_tokenizer([], split_digits=True)  # one token per byte
    teacher = byte_level_tokenizer([("1", "2"), ("1", "5"), ("Ã", "·")], split_digits=False)
    return TokenizerPair.build(student, teacher)


def both(pair: TokenizerPair, text: str):
    s_ids = pair.student(text, add_special_tokens=False)["input_ids"]
    out = segment_responses(pair, [s_ids], [True])
    t_ids = out.teacher_ids[0][:-1]  # without the EOS segment_responses appended
    return naive_segments(pair.student, pair.teacher, s_ids, t_ids, True), fast_segments(out.per_response[0])


def test_naive_reference_finds_the_hand_worked_segments(hand_pair):
    naive, fast = both(hand_pair, "12+3=15")
    # [1 2 +]|[12 +]  [3]|[3]  [=]|[=]  [1 5 eos]|[15 eos]
    assert naive == fast == [(0, 3, 0, 2), (3, 4, 2, 3), (4, 5, 3, 4), (5, 8, 4, 6)]


def test_naive_reference_loses_track_after_a_split_character(hand_pair):
    """Why the bench text avoids split characters: decoding half of ÷ alone gives U+FFFD, and the
    decoded histories never agree again (NOTES.md); byte spans keep matching after it."""
    naive, fast = both(hand_pair, "a÷b 12+15")
    assert len(fast) > 2 and fast[-1][1] == 11  # the fast path reaches EOS (10 bytes, 10 tokens, EOS)
    assert naive == fast[:1]  # only "a" matches before ÷; nothing after


@pytest.fixture(scope="module")
def result(split_tokenizer, merge_tokenizer) -> dict:
    settings = BenchSettings(
        lengths=(64, 256), pairs=(("fixture:gpt2", "fixture:deepseek"),), tokens_per_point=512, repeats=1,
        loss_pair=("split", "merge"), loss_lengths=(32, 64), loss_aligners=("exact", "simct"),
        step_overrides=("data.batch_size=2", "rollout.max_new_tokens=8", "data.val_size=20"), step_repeats=1,
    )  # fmt: skip
    return run_bench(settings, tokenizers={"split": split_tokenizer, "merge": merge_tokenizer}, log=lambda _: None)


def test_bench_json_has_every_section(result):
    json.loads(json.dumps(result, default=str))  # what run_bench_command writes
    from lightning_opd.align import ALIGNERS

    assert {r["aligner"] for r in result["alignment"]} == set(ALIGNERS)
    assert {(r["length"], r["batch"]) for r in result["alignment"]} == {(64, 8), (256, 2)}
    for r in result["alignment"]:
        assert 0 < r["without_tokenize_ms_per_1k"] and 0 < r["tokenize_ms_per_1k"]
        assert r["tokenize_ms_per_1k"] <= r["segment_ms_per_1k"] * 3  # (separately timed, noisy)
        assert r["unaligned_sequences"] == 0 and 0 < r["coverage"] <= 1
    assert [r["aligner"] for r in result["loss"]] == ["exact", "simct"] * 2
    for r in result["loss"]:
        assert r["rows"] > 0 and r["forward_s"] > 0 and r["backward_s"] > 0 and r["logits_mb"] > 0
    step = result["step"]
    assert set(step["mean"]) >= {"rollout", "teacher", "student_forward", "align", "loss", "update", "step"}
    assert step["mean"]["step"] >= sum(step["mean"][k] for k in ("rollout", "teacher", "align", "loss", "update"))
    assert 0 < step["align_rows_loss_share"] < 1
    names = " | ".join(t["target"] for t in result["targets"])
    for part in ("ms per 1k", "naive reference", "tiny default's step", "loss memory (simct)"):
        assert part in names
    for t in result["targets"]:  # a tiny vocabulary's loss allocates too little to measure its peak
        assert isinstance(t["met"], bool) or (t["met"] is None and t["target"].startswith("loss memory"))


def test_naive_reference_does_the_same_work_as_the_fast_path(result):
    """Same segments, so the same coverage, on the bench's text at every measured length."""
    assert [r["length"] for r in result["naive"]] == [64, 256]
    for r in result["naive"]:
        assert r["same_segments"] is True
        assert r["naive_coverage"] == r["fast_coverage"] > 0.9
        assert r["speedup"] > 0 and r["speedup_without_tokenize"] > 0


def test_bench_rejects_bad_lengths(capsys):
    assert main(["bench", "--lengths", "256,abc"]) == 2
    assert "--lengths wants positive integers" in capsys.readouterr().err


def test_row_building_runs_on_one_torch_thread_and_restores_the_count():
    import torch

    from lightning_opd.align.base import single_threaded
    from lightning_opd.threads import _OPENMP

    if not _OPENMP:
        pytest.skip("torch's native parallel backend cannot change its thread count once used")
    original = torch.get_num_threads()
    torch.set_num_threads(2)  # more than one, whatever this machine's default is
    try:
        seen = single_threaded(torch.get_num_threads)()
        assert seen == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)
