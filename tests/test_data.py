"""Tasks and the prompt datamodule: arithmetic that is right, streams that shard and resume."""

from __future__ import annotations

import json
import pickle
import re
from itertools import islice
from pathlib import Path

import pytest

from lightning_opd.config import ArithConfig, DataConfig
from lightning_opd.data import (
    Batch,
    DataError,
    Example,
    PromptDataModule,
    PromptStream,
    build_task,
    split_reference,
)
from lightning_opd.rewards import normalize_number

GSM8K_TEST = Path(__file__).resolve().parents[1] / "data/gsm8k/test.jsonl"
PROBLEM = re.compile(r"What is (\d+)([-+*])(\d+)\?")


def arith(seed: int = 0, **arith_kw) -> DataConfig:
    return DataConfig(source="arith", seed=seed, val_size=50, arith=ArithConfig(**arith_kw))


def write_jsonl(path: Path, n: int, broken: dict[int, str] | None = None, blank=()) -> Path:
    """n lines of GSM8K-shaped records; line numbers in `broken` get that raw text instead."""
    lines = []
    for lineno in range(1, n + 1):
        if lineno in blank:
            lines.append("")
        elif broken and lineno in broken:
            lines.append(broken[lineno])
        else:
            lines.append(
                json.dumps({"question": f"q{lineno}?", "answer": f"so\n#### {lineno},000"})
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def jsonl(path: Path, **kw) -> DataConfig:
    return DataConfig(source="jsonl", path=str(path), **{"val_size": 10, "batch_size": 4, **kw})


def uids(batches) -> list[str]:
    return [ex.uid for batch in batches for ex in batch]


# --------------------------------------------------------------------------- arith


def test_arith_examples_are_a_function_of_seed_and_index():
    a, b, c = build_task(arith(0)), build_task(arith(0)), build_task(arith(1))
    first = [a.example(i) for i in range(50)]
    assert first == [b.example(i) for i in range(50)]
    assert a.example(7) == first[7]  # random access, any order
    assert [ex.prompt for ex in first] != [c.example(i).prompt for i in range(50)]


def check_addition(a: int, b: int, steps: list[str]) -> None:
    """Each column adds the operands' digits and the previous carry; the sums spell a+b."""
    carry, value, width = 0, 0, max(len(str(a)), len(str(b)))
    assert len(steps) == width
    for i, step in enumerate(steps):
        lhs, rhs = step.split("=")
        terms = [int(t) for t in lhs.split("+")]
        assert terms[:2] == [a // 10**i % 10, b // 10**i % 10]
        assert terms[2:] == ([carry] if i else [])
        assert sum(terms) == int(rhs)
        carry, value = int(rhs) // 10, value + int(rhs) % 10 * 10**i
    assert value + carry * 10**width == a + b


def check_subtraction(a: int, b: int, steps: list[str]) -> None:
    """A negative result is flipped first; then columns subtract digit and borrow."""
    if a < b:
        assert steps[0] == f"-({b}-{a})"
        a, b, steps = b, a, steps[1:]
    borrow, value = 0, 0
    assert len(steps) == len(str(a))
    for i, step in enumerate(steps):
        lhs, rhs = step.split("=")
        terms = [int(t) for t in lhs.split("-")]
        digit = a // 10**i % 10
        assert terms[0] in (digit, digit + 10) and terms[1] == b // 10**i % 10
        assert terms[2:] == ([borrow] if i else [])
        assert 0 <= int(rhs) <= 9 and terms[0] - sum(terms[1:]) == int(rhs)
        borrow, value = int(terms[0] > 9), value + int(rhs) * 10**i
    assert value == a - b


def test_arith_worked_solutions_are_right_and_end_in_the_answer():
    task = build_task(arith(3, min_digits=1, max_digits=4, ops="+-*"))
    ops_seen = set()
    for i in range(600):
        ex = task.example(i)
        a, op, b = PROBLEM.fullmatch(ex.prompt).groups()
        a, b = int(a), int(b)
        expected = str({"+": a + b, "-": a - b, "*": a * b}[op])
        assert ex.answer == expected
        *steps, mark, final = ex.solution.split(" ")
        assert (mark, final) == ("####", expected)
        for step in steps:
            if "=" in step:
                lhs, rhs = step.split("=")
                assert eval(lhs) == int(rhs), (ex, step)  # plain integer arithmetic
        if op == "+":
            check_addition(a, b, steps)
        elif op == "-":
            check_subtraction(a, b, steps)
        ops_seen.add(op)
        assert task.check(ex.solution, ex) is True
        assert task.check(f"#### {int(expected) + 1}", ex) is False
    assert ops_seen == {"+", "-", "*"}


def test_arith_solution_of_the_documented_example():
    steps = build_task(arith())
    ex = steps._make((347, "+", 85), "x")
    assert (ex.prompt, ex.solution) == ("What is 347+85?", "7+5=12 4+8+1=13 3+0+1=4 #### 432")
    assert (
        steps._make((85, "-", 432), "y").solution == "-(432-85) 12-5=7 13-8-1=4 4-0-1=3 #### -347"
    )


def test_arith_without_worked_solution_answers_directly():
    ex = build_task(arith(worked_solution=False)).example(0)
    assert ex.solution == f"#### {ex.answer}"


def test_arith_validation_is_fixed_and_never_trained_on():
    task = build_task(arith(0))
    val = task.validation_set()
    assert val == task.validation_set() == build_task(arith(0)).validation_set()
    assert len(val) == 50 and len({ex.prompt for ex in val}) == 50
    train = {task.example(i).prompt for i in range(20_000)}
    assert not train & {ex.prompt for ex in val}


def test_arith_small_problem_space_still_excludes_validation():
    cfg = arith(0, min_digits=1, max_digits=1, ops="+")  # only 100 distinct problems
    task = build_task(cfg)
    held_out = {ex.prompt for ex in task.validation_set()}
    assert not {task.example(i).prompt for i in range(2000)} & held_out
    with pytest.raises(DataError, match="val_size"):
        build_task(DataConfig(val_size=60, arith=ArithConfig(min_digits=1, max_digits=1, ops="+")))


@pytest.mark.parametrize("bad", [dict(ops="/"), dict(ops=""), dict(min_digits=3, max_digits=2)])
def test_arith_bad_settings_name_the_key(bad):
    with pytest.raises(DataError, match="data.arith"):
        build_task(arith(**bad))


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(DataError, match="arith"):
        build_task(DataConfig(source="nope"))


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (3, 2), (2, 3)])
def test_arith_shards_are_disjoint_and_together_contiguous(world, workers):
    task, bs, per_shard = build_task(arith()), 3, 4
    seen = []
    for rank in range(world):
        stream = PromptStream(task, bs, rank=rank, world_size=world)
        for w in range(workers):
            seen += uids(islice(stream.worker_batches(w, workers), per_shard))
    n = world * workers * bs * per_shard
    assert sorted(seen) == sorted(f"arith-0-{i}" for i in range(n))


def test_stream_start_skips_that_many_of_the_shard():
    task = build_task(arith())
    assert next(task.stream(shard=2, num_shards=5, start=7)) == task.example(2 + 7 * 5)


# --------------------------------------------------------------------------- jsonl


def test_split_reference_takes_the_text_after_the_last_mark():
    assert split_reference("a #### 3\nb\n#### 1,234 ") == ("1234", "a #### 3\nb\n#### 1,234 ")
    assert split_reference(" 72 ") == ("72", "#### 72")


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_jsonl_shards_cover_every_training_line_exactly_once(tmp_path, world, workers):
    path = write_jsonl(tmp_path / "d.jsonl", 103, blank=(40, 41))
    task = build_task(jsonl(path))
    val = {ex.uid for ex in task.validation_set()}
    assert val == {f"{path}:{i}" for i in range(1, 11)}
    seen = []
    for rank in range(world):
        stream = PromptStream(task, 4, rank=rank, world_size=world, repeat=False)
        for w in range(max(workers, 1)):
            seen += uids(stream.worker_batches(w, max(workers, 1)))
    expected = {f"{path}:{i}" for i in range(11, 104)} - {f"{path}:40", f"{path}:41"}
    assert len(seen) == len(set(seen)) == len(expected) and set(seen) == expected


def test_jsonl_real_dataloader_with_two_workers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", 103)
    dm = PromptDataModule(jsonl(path, num_workers=2), repeat=False)
    batches = list(dm.train_dataloader())
    assert all(isinstance(b, Batch) and all(isinstance(e, Example) for e in b) for b in batches)
    seen = uids(batches)
    assert len(seen) == len(set(seen)) == 93
    assert set(seen) == {f"{path}:{i}" for i in range(11, 104)}
    assert [len(b) for b in batches].count(4) >= len(batches) - 2  # each worker's last is short


def test_jsonl_repeat_runs_pass_after_pass(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", 23)  # 13 training lines
    stream = PromptStream(build_task(jsonl(path)), 5, repeat=True)
    seen = uids(islice(stream.worker_batches(0, 1), 13))  # 65 examples: 5 passes
    assert all(seen.count(uid) == 5 for uid in set(seen)) and len(set(seen)) == 13
    assert seen[:13] == seen[13:26]  # the same order every pass


def test_datamodule_and_dataset_pickle(tmp_path):
    dm = PromptDataModule(jsonl(write_jsonl(tmp_path / "d.jsonl", 30)))
    stream = dm.train_dataloader().dataset
    copy = pickle.loads(pickle.dumps(stream))
    assert uids(islice(iter(copy), 2)) == uids(islice(iter(stream), 2))


def test_gsm8k_field_answer_becomes_number_and_solution_checks(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", 12)
    ex = build_task(jsonl(path)).validation_set()[2]
    assert (ex.prompt, ex.answer, ex.answer_kind) == ("q3?", "3000", "math")
    assert ex.solution == "so\n#### 3,000" and build_task(jsonl(path)).check(ex.solution, ex)


# --------------------------------------------------------------------------- bad lines

BROKEN = {
    "bad JSON": ('{"question": "q", "answer": ', "bad JSON"),
    "not an object": ('["q", "a"]', "JSON object"),
    "missing answer": ('{"question": "q"}', "missing field 'answer'"),
    "missing prompt": ('{"answer": "1"}', "missing field 'question'"),
    "prompt not text": ('{"question": 3, "answer": "1"}', "'question' must be"),
    "answer a list": ('{"question": "q", "answer": [1]}', "'answer' must be"),
    "empty answer": ('{"question": "q", "answer": "x ####  "}', "empty final answer"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
@pytest.mark.parametrize("lineno", [4, 57])  # in the held-out block, and in training
def test_bad_line_error_names_file_line_and_problem(tmp_path, kind, lineno):
    raw, message = BROKEN[kind]
    path = write_jsonl(tmp_path / "broken.jsonl", 60, broken={lineno: raw})
    dm = PromptDataModule(jsonl(path), repeat=False)
    with pytest.raises(DataError, match=re.escape(f"broken.jsonl:{lineno}:")) as err:
        dm.val_examples()
        list(dm.train_dataloader())
    assert message in str(err.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_bad_lines_are_counted(tmp_path, workers):
    # 48 good training lines (12 full batches) and a bad last line: counted all the same
    broken = {3: "{oops", 30: "[]", 31: '{"question": "q"}', 62: "nan nan"}
    path = write_jsonl(tmp_path / "d.jsonl", 62, broken=broken)
    dm = PromptDataModule(jsonl(path, on_bad_line="skip", num_workers=workers), repeat=False)
    val = dm.val_examples()
    assert len(val) == 10 and f"{path}:3" not in {ex.uid for ex in val}
    seen = uids(dm.train_dataloader())
    assert set(seen) == {f"{path}:{i}" for i in range(12, 63)} - {f"{path}:{i}" for i in broken}
    assert dm.bad_lines == len(broken)


def test_val_path_holds_out_a_separate_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", 20)
    val = write_jsonl(tmp_path / "val.jsonl", 7)
    dm = PromptDataModule(jsonl(train, val_path=str(val)), repeat=False)
    assert [ex.uid for ex in dm.val_examples()] == [f"{val}:{i}" for i in range(1, 8)]
    assert sorted(uids(dm.train_dataloader())) == sorted(f"{train}:{i}" for i in range(1, 21))


def test_missing_file_and_too_small_file_say_so(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        build_task(jsonl(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match="val_size"):
        build_task(jsonl(write_jsonl(tmp_path / "d.jsonl", 5))).validation_set()


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="GSM8K sample not available")
def test_gsm8k_sample_parses_and_its_solutions_check():
    task = build_task(DataConfig(source="jsonl", path=str(GSM8K_TEST), val_size=50))
    examples = task.validation_set()
    assert len(examples) == 50
    for ex in examples:
        assert normalize_number(ex.answer) is not None, ex.answer
        assert task.check(ex.solution, ex), ex.uid


# --------------------------------------------------------------------------- resume


def resume_cases(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", 33)  # 23 training lines: a resume past a pass
    for workers in (0, 2):
        yield DataConfig(batch_size=4, num_workers=workers)
        yield jsonl(path, num_workers=workers)


@pytest.mark.parametrize("k", [0, 3, 8])
def test_resumed_datamodule_continues_with_the_next_batch(tmp_path, k):
    for cfg in resume_cases(tmp_path):
        first = PromptDataModule(cfg)
        original = list(islice(first.train_dataloader(), k + 2))
        state = first.state_dict()
        assert state["batches_consumed"] == k + 2
        again = PromptDataModule(cfg)
        again.load_state_dict({**state, "batches_consumed": k})
        resumed = list(islice(again.train_dataloader(), 2))
        assert uids(resumed) == uids(original[k:]), (cfg.source, cfg.num_workers)


def test_trainer_counts_only_consumed_batches_and_checkpoints_them(tmp_path):
    import lightning as L
    import torch

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[str]] = []

        def training_step(self, batch, batch_idx):
            assert isinstance(batch, list) and all(isinstance(e, Example) for e in batch)
            self.seen.append([e.uid for e in batch])
            return (self.w - 1).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm, probe = PromptDataModule(DataConfig(batch_size=2)), Probe()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(probe, datamodule=dm)
    assert dm.batches_consumed == 3 and len(probe.seen) == 3
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["PromptDataModule"]
    again = PromptDataModule(DataConfig(batch_size=2))
    again.load_state_dict(saved)
    assert uids(islice(again.train_dataloader(), 1)) == ["arith-0-6", "arith-0-7"]
