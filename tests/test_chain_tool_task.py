"""The chain_tool task (lightning_opd.data.chain_tool_task): three dependent tool calls per problem."""

from __future__ import annotations

import re

import pytest

from lightning_opd.config import DataConfig, load
from lightning_opd.data import TASKS, build_task
from lightning_opd.data.chain_tool_task import ChainToolTask, apply
from lightning_opd.rollout.sandbox import isolation_problem, run_python_batch
from lightning_opd.rollout.tools import find_tool_call, format_observation, observation_spans
from tests.test_train import ROOT

CALL = re.compile(r"^# Step (\d): (add|subtract|mod|times) (\d+)\nprint\((\d+)([*+\-%])(\d+)\)\n$")
WORDS = {"times": "*", "add": "+", "subtract": "-", "mod": "%"}


def parse_call(code: str, k: int | None = None) -> tuple[int, str, int]:
    """(left operand, op, right operand) of a call, checking that its comment states the same
    operation and operand (and, given k, that it is step k+1)."""
    number, words, stated, left, op, right = CALL.match(code).groups()
    assert WORDS[words] == op and stated == right, code
    assert k is None or int(number) == k + 1, (k, code)
    return int(left), op, int(right)


def calls_and_outputs(solution: str) -> tuple[list[str], list[str]]:
    """The code of each fenced call of a trace and the text of each observation after it."""
    spans = observation_spans(solution, "fenced")
    codes, outputs, start = [], [], 0
    for s, e in spans:
        codes.append(find_tool_call(solution[start:s], "fenced"))
        outputs.append(solution[s:e].removeprefix("\n```output\n").removesuffix("\n```\n"))
        start = e
    return codes, outputs


def test_chain_tool_is_registered_and_deterministic() -> None:
    assert TASKS["chain_tool"] is ChainToolTask
    cfg = DataConfig(source="chain_tool", val_size=50, seed=3)
    task, again = build_task(cfg), ChainToolTask(cfg)
    examples = [task.example(i) for i in range(300)]
    assert examples == [again.example(i) for i in range(300)]
    assert examples != [ChainToolTask(DataConfig(source="chain_tool", val_size=50, seed=4)).example(i)
                        for i in range(300)]  # fmt: skip
    val = {ex.prompt for ex in task.validation_set()}
    assert len(val) == 50 and not val & {ex.prompt for ex in examples}
    assert task.validation_set() == again.validation_set()
    shard = ChainToolTask(cfg).stream(shard=1, num_shards=2, start=3)
    assert next(shard) == examples[7]
    assert len({ex.prompt for ex in examples}) == len(examples)
    with pytest.raises(Exception, match="val_size"):
        ChainToolTask(DataConfig(source="chain_tool", val_size=-1))


def test_every_problem_needs_three_dependent_nontrivial_calls() -> None:
    task = ChainToolTask(DataConfig(source="chain_tool", val_size=20, seed=1))
    examples = [task.example(i) for i in range(300)] + task.validation_set()
    last_ops, in_prompt = set(), 0
    for ex in examples:
        start = int(re.match(r"Start with (\d+)\. ", ex.prompt).group(1))
        codes, outputs = calls_and_outputs(ex.solution)
        assert len(codes) == len(outputs) == 3, ex.solution
        value = start
        for k, (code, out) in enumerate(zip(codes, outputs, strict=True)):
            left, op, right = parse_call(code, k)
            # call k's left operand is the previous call's output (the start for the first)
            assert left == value, (k, ex.solution)
            if k > 0:
                assert str(left) == outputs[k - 1]  # copied from the tool's output ...
                # ... and (but for coincidences) not one of the prompt's numbers
                in_prompt += str(left) in re.findall(r"(?<!Step )\b\d+\b", ex.prompt)
            # the step's words come from the prompt, which the call's comment repeats
            comment = code.splitlines()[0].removeprefix("# ")
            assert ex.prompt.count(comment + ".") == 1, (comment, ex.prompt)
            value = apply(value, op, right)
            assert out == str(value) and (value > 0 or (k == 2 and op == "%" and value == 0))
        first_left, first_op, first_right = parse_call(codes[0])
        # the first step is a real multiplication: 2 digits times 3..9, >= 36 out
        assert first_op == "*" and 12 <= first_left <= 99 and 3 <= first_right <= 9
        assert int(outputs[0]) >= 36 and int(outputs[1]) >= 1
        # at most four digits anywhere (what tiny models can copy: docs/results/chain_tool.md)
        assert max(int(o) for o in outputs) <= 9999
        last_ops.add(parse_call(codes[2])[1])
        assert ex.answer == outputs[-1] and ex.solution.endswith(f"#### {ex.answer}")
    assert last_ops == {"%", "*"}
    assert in_prompt <= 0.02 * 2 * len(examples)


def test_the_answer_is_right_only_if_every_step_was() -> None:
    task = ChainToolTask(DataConfig(source="chain_tool", val_size=10))
    for ex in [task.example(i) for i in range(50)]:
        assert task.check(ex.solution, ex) and not task.check(f"#### {int(ex.answer) + 1}", ex)
        start = int(re.match(r"Start with (\d+)\. ", ex.prompt).group(1))
        codes, _ = calls_and_outputs(ex.solution)
        steps = [parse_call(c)[1:] for c in codes]
        for k in range(3):  # an off-by-one at step k, carried through the later steps
            value = start
            for j, (op, x) in enumerate(steps):
                value = apply(value, op, x) + (1 if j == k else 0)
            # a single slip changes the answer unless a later `% m` happens to absorb it, which
            # an off-by-one cannot (it changes the residue)
            assert not task.check(f"#### {value}", ex), (ex.prompt, k)


def test_chain_traces_hold_real_sandbox_output() -> None:
    assert isolation_problem() is None  # bubblewrap: the traces are checked in the real sandbox
    task = ChainToolTask(DataConfig(source="chain_tool", val_size=10))
    examples = [task.example(i) for i in range(4)]
    codes = [code for ex in examples for code in calls_and_outputs(ex.solution)[0]]
    results = run_python_batch(codes)
    observed = iter(format_observation(r, "fenced", 256) for r in results)
    assert all(r.ok for r in results)
    for ex in examples:
        for s, e in observation_spans(ex.solution, "fenced"):
            assert ex.solution[s:e] == next(observed)


def test_sft_masks_every_observation(split_tokenizer) -> None:
    from lightning_opd.sft import sft_batch

    task = ChainToolTask(DataConfig(source="chain_tool", val_size=10))
    ex = task.example(0)
    ids, _, labels = sft_batch(split_tokenizer, [ex], "cpu", task.observation_spans)
    text = split_tokenizer.decode(labels[0][labels[0] != -100].tolist(), skip_special_tokens=True)
    spans = observation_spans(ex.solution, "fenced")
    assert len(spans) == 3 and "```output" not in text
    kept, start = "", 0
    for s, e in spans:
        kept, start = kept + ex.solution[start:s], e
    kept += ex.solution[start:]
    assert text.replace(" ", "") == kept.replace(" ", "")


@pytest.mark.parametrize("name", ["chain_tool_opd", "chain_tool_sod"])
def test_chain_configs_resolve(name: str) -> None:
    cfg = load(ROOT / "configs" / "experiment" / f"{name}.yaml")
    assert cfg.data.source == "chain_tool" and cfg.tools.enabled
    assert cfg.sod.enabled == (name == "chain_tool_sod")
    assert cfg.sod.record  # the OPD run records its step divergences too


def test_generator_version_keys_the_model_cache() -> None:
    """Models SFT'd on an older chain_tool text are not reused: the task's generator_version is
    part of the cache key; tasks without one keep the keys they had."""
    from lightning_opd.prepare import _task_key

    chain = load(ROOT / "configs" / "experiment" / "chain_tool_opd.yaml")
    assert _task_key(chain)["generator_version"] == ChainToolTask.generator_version == 3
    assert "generator_version" not in _task_key(load(ROOT / "configs" / "experiment" / "default.yaml"))
