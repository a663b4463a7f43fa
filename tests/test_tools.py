"""Tests for lightning_opd.rollout.tools (parsing, observations, the tool loop) and the
arith_tool task (lightning_opd.data.tool_task)."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from lightning_opd.config import (
    DataConfig,
    RolloutConfig,
    SandboxConfig,
    TokenizerConfig,
    ToolsConfig,
)
from lightning_opd.data.tasks import Example
from lightning_opd.data.tool_task import ArithToolTask, observation_spans
from lightning_opd.models import render_prompt, train_tokenizer
from lightning_opd.rewards import is_correct
from lightning_opd.rollout import tools as tools_module
from lightning_opd.rollout.sandbox import ToolResult, isolation_problem, run_python_batch
from lightning_opd.rollout.tools import (
    ToolCallStop,
    find_tool_call,
    first_tool_call,
    format_observation,
    generate_with_tools,
    middle_truncate,
    model_written_text,
    parse_tool_call,
    reward_texts,
)

FENCED_CALL = "Let me compute.\n```python\nprint(12*34)\n```"
FINAL = "#### 408"


def hermes(code: str) -> str:
    body = json.dumps({"name": "code_interpreter", "arguments": {"code": code}})
    return f"<tool_call>\n{body}\n</tool_call>"


@pytest.fixture(scope="module")
def tok():
    corpus = [FENCED_CALL, FINAL, hermes("print(1+1)"), "```output\n408\n```", "What is 12*34?",
              "<tool_response>\n2\n</tool_response>", "while True: pass", "import time"] * 20
    return train_tokenizer(corpus, TokenizerConfig(digits="split", vocab_size=60), teacher=False)


class ScriptedModel:
    """Stands in for a causal LM: per prompt, a list of turn texts; turn k is emitted after k
    observations (counted in the input), the last one followed by EOS. Honours HF's
    `stopping_criteria` unless `ignore_stopping` (then the loop's cut must do the work)."""

    def __init__(self, tok, scripts: dict[str, list[str]], marker: str, ignore_stopping=False,
                 extra: str = "\n") -> None:
        self.tok, self.marker, self.ignore, self.training = tok, marker, ignore_stopping, True
        self.scripts = {tuple(self.encode(p)): turns for p, turns in scripts.items()}
        # emitted after each non-final turn and cut off by the loop; a real model goes on after
        # its call too (at least the token that ends the fence's line, which the criterion needs)
        self.extra = self.encode(extra)
        self._p = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def parameters(self):
        yield self._p

    def eval(self):
        self.training = False
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def _script(self, ids: list[int], eos: int) -> list[int]:
        prompt = next(p for p in self.scripts if tuple(ids[: len(p)]) == p)
        turns = self.scripts[prompt]
        k = self.tok.decode(ids[len(prompt):]).count(self.marker)
        last = k == len(turns) - 1
        return self.encode(turns[k]) + ([eos] if last else self.extra)

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id,
                 stopping_criteria=None, **_):
        self.calls += 1
        self.saw_criterion = stopping_criteria is not None
        scripts = [self._script(row[m.bool()].tolist(), eos_token_id)
                   for row, m in zip(input_ids, attention_mask, strict=True)]
        seq, done = input_ids.clone(), torch.zeros(len(scripts), dtype=torch.bool)
        for step in range(max_new_tokens):
            nxt = [s[step] if step < len(s) and not d else pad_token_id
                   for s, d in zip(scripts, done.tolist(), strict=True)]
            seq = torch.cat([seq, torch.tensor(nxt)[:, None]], 1)
            done |= torch.tensor(nxt) == eos_token_id
            done |= torch.tensor([step + 1 >= len(s) for s in scripts])
            if stopping_criteria is not None and not self.ignore:
                done |= stopping_criteria(seq, None)
            if done.all():
                break
        return seq


def run_loop(tok, scripts, fmt="fenced", max_turns=16, timeout_s=5.0, budget=200,
             sandbox: SandboxConfig | None = None, max_output_chars: int = 256, **kw):
    marker = "```output" if fmt == "fenced" else "<tool_response>"
    model = ScriptedModel(tok, scripts, marker, **kw)
    prompts = [model.encode(p) for p in scripts]
    tools = ToolsConfig(enabled=True, format=fmt, max_turns=max_turns, max_output_chars=max_output_chars,
                        sandbox=sandbox or SandboxConfig(timeout_s=timeout_s))
    out = generate_with_tools(model, tok, prompts, RolloutConfig(max_new_tokens=budget), tools,
                              eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    return out, model


def masked_text(tok, ids, mask, value):
    return tok.decode([t for t, m in zip(ids, mask, strict=True) if m == value])


# ----------------------------------------------------------------------------- parsing


def test_fenced_call_found_only_when_complete_and_at_the_end() -> None:
    assert find_tool_call(FENCED_CALL, "fenced") == "print(12*34)\n"
    assert find_tool_call(FENCED_CALL + "\n", "fenced") == "print(12*34)\n"
    assert find_tool_call("```python\nprint(1)\n``", "fenced") is None  # no closing fence yet
    assert find_tool_call("```python\nprint(1)", "fenced") is None
    assert find_tool_call(FENCED_CALL + "\nso it is 408", "fenced") is None  # not at the end
    assert find_tool_call("```output\n408\n```", "fenced") is None  # an observation, not a call
    two = FENCED_CALL + "\n```output\n408\n```\n```python\nprint(2)\n```"
    assert find_tool_call(two, "fenced") == "print(2)\n"


def test_hermes_call_parsed_and_malformed_reported() -> None:
    assert find_tool_call("I'll run it.\n" + hermes("print(12*34)"), "hermes") == "print(12*34)"
    assert find_tool_call(hermes("x = 1")[:-3], "hermes") is None  # incomplete closing tag
    bad = parse_tool_call('<tool_call>{"name": "code_interpreter", "arguments": {"code": </tool_call>',
                          "hermes")
    assert bad is not None and bad.code is None and "not valid JSON" in bad.error
    assert find_tool_call('<tool_call>{"name": </tool_call>', "hermes") is None  # never raises
    wrong = parse_tool_call('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "hermes")
    assert "unknown tool 'search'" in wrong.error
    no_code = parse_tool_call('<tool_call>{"name": "code_interpreter", "arguments": {}}</tool_call>',
                              "hermes")
    assert no_code.code is None and "code" in no_code.error
    as_string = '<tool_call>{"name": "code_interpreter", "arguments": "{\\"code\\": \\"print(3)\\"}"}</tool_call>'
    assert find_tool_call(as_string, "hermes") == "print(3)"
    with pytest.raises(ValueError, match="format"):
        find_tool_call("x", "xml")


def test_fence_closes_only_where_it_starts_a_line() -> None:
    code = 'print("```")\nprint(2)\n'  # a fence inside a string does not start a line
    assert find_tool_call(f"```python\n{code}```", "fenced") == code
    assert find_tool_call(f"```python\n{code}```  \n", "fenced") == code  # trailing spaces
    assert find_tool_call("```python\n```", "fenced") == ""  # an empty call still closes
    # The documented limit: a code line starting with ``` (inside a multi-line string) ends it.
    starts_a_line = 's = """\n```python\n"""\nprint(s)\n'
    assert find_tool_call(f"```python\n{starts_a_line}```", "fenced") is None  # not at the end
    assert first_tool_call(f"```python\n{starts_a_line}```", "fenced").code == 's = """\n'
    # A closing fence completes the call at once, while the text still grows: a model never
    # trained on what follows it (the observation is masked out of SFT labels) must not decide.
    assert first_tool_call("```python\nprint(1)\n```", "fenced", streaming=True).code == "print(1)\n"
    assert first_tool_call('```python\nprint("```', "fenced", streaming=True) is None


@pytest.mark.parametrize("tag", ["python", "python3", "Python", "py", "py3", "PY3"])
def test_fenced_python_tags(tag: str) -> None:
    assert find_tool_call(f"```{tag}\nprint(1)\n```", "fenced") == "print(1)\n"


@pytest.mark.parametrize("tag", ["pythonic", "output", "bash", ""])
def test_other_fences_are_not_calls(tag: str) -> None:
    assert find_tool_call(f"```{tag}\nprint(1)\n```", "fenced") is None


def test_hermes_close_tag_inside_a_code_string() -> None:
    code = 'print("</tool_call>")'
    call = hermes(code)
    assert find_tool_call(call, "hermes") == code
    through_first_tag = call[: call.index("</tool_call>") + len("</tool_call>")]
    assert first_tool_call(through_first_tag, "hermes", streaming=True) is None  # keep generating
    escaped = 'print("\\"</tool_call>")'  # an escaped quote does not end the JSON string
    assert find_tool_call(hermes(escaped), "hermes") == escaped
    # an unterminated string: incomplete while the text grows; once final, a malformed call
    open_string = '<tool_call>{"name": "code_interpreter", "arguments": {"code": "x}}</tool_call>'
    assert first_tool_call(open_string, "hermes", streaming=True) is None
    assert "not valid JSON" in first_tool_call(open_string, "hermes").error


# ----------------------------------------------------------------------------- observations


def test_middle_truncate_bounds_and_keeps_head_and_tail() -> None:
    assert middle_truncate("short", 10) == "short"
    s = "HEAD" + "x" * 5000 + "TAIL"
    for n in (40, 64, 256):
        out = middle_truncate(s, n)
        assert len(out) <= n and out.startswith("HEAD") and out.endswith("TAIL")
        cut = int(out.split("[truncated ")[1].split(" chars]")[0])
        assert len(out) - len(f"…[truncated {cut} chars]…") + cut == len(s)  # the count is exact
    assert middle_truncate(s, 5) == "HEADx"  # too short for the marker: a plain prefix


def test_observation_wrapping_and_errors() -> None:
    ok = ToolResult("408\n", "", ok=True, timed_out=False)
    assert format_observation(ok, "fenced", 256) == "\n```output\n408\n```\n"
    assert format_observation(ok, "hermes", 256) == "\n<tool_response>\n408\n</tool_response>\n"
    failed = ToolResult("partial\n", "Traceback...\nZeroDivisionError", ok=False, timed_out=False,
                        error="exited with code 1")
    text = format_observation(failed, "fenced", 256)
    assert "partial" in text and "ZeroDivisionError" in text and "exited with code 1" in text
    long = format_observation(ToolResult("7" * 1000, "", True, False), "fenced", 50)
    assert len(long) == 50 + len("\n```output\n\n```\n") and "truncated" in long


# ----------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("ignore_stopping", [False, True])
def test_scripted_tool_turn(tok, ignore_stopping: bool) -> None:
    # without the stopping criterion the model rambles past the call; the loop must cut there
    out, model = run_loop(tok, {"What is 12*34?": [FENCED_CALL, FINAL]},
                          ignore_stopping=ignore_stopping, extra="\n```output\n999\n```")
    assert model.saw_criterion  # generate() got the tool-call stopping criterion
    ids, mask, steps = out.response_ids[0], out.loss_mask[0], out.step_ids[0]
    text = tok.decode(ids)
    assert text == FENCED_CALL + "\n```output\n408\n```\n" + FINAL
    assert masked_text(tok, ids, mask, 0) == "\n```output\n408\n```\n"  # exactly the observation
    assert masked_text(tok, ids, mask, 1) == FENCED_CALL + FINAL
    n_call = len(tok(FENCED_CALL, add_special_tokens=False)["input_ids"])
    assert steps[:n_call] == [0] * n_call and steps[-1] == 1
    assert all((s == -1) == (m == 0) for s, m in zip(steps, mask, strict=True))
    assert len(ids) == len(mask) == len(steps)
    assert out.ended_with_eos == [True] and out.tool_calls == [1] and out.tool_successes == [1]


def test_max_turns_enforced(tok) -> None:
    call = "```python\nprint(1)\n```"
    out, model = run_loop(tok, {"Q": [call, call, call, FINAL]}, max_turns=1)
    assert out.tool_calls == [1] and out.ended_with_eos == [False]
    assert tok.decode(out.response_ids[0]).endswith(call) and model.calls == 2
    assert sorted(set(out.step_ids[0])) == [-1, 0, 1]


def test_hanging_tool_call_times_out(tok) -> None:
    out, _ = run_loop(tok, {"Q": ["```python\nwhile True: pass\n```", FINAL]}, timeout_s=0.5)
    obs = masked_text(tok, out.response_ids[0], out.loss_mask[0], 0)
    assert "timed out" in obs
    assert out.tool_calls == [1] and out.tool_successes == [0] and out.ended_with_eos == [True]
    assert tok.decode(out.response_ids[0]).endswith(FINAL)  # training data still produced


def test_malformed_hermes_gets_an_error_observation(tok) -> None:
    bad = '<tool_call>{"name": "code_interpreter", "arguments": {"code": print(1)}}</tool_call>'
    out, _ = run_loop(tok, {"Q": [bad, hermes("print(12*34)"), FINAL]}, fmt="hermes")
    obs = masked_text(tok, out.response_ids[0], out.loss_mask[0], 0)
    assert obs.startswith("\n<tool_response>\nError: the tool call is not valid JSON")
    assert obs.endswith("\n<tool_response>\n408\n</tool_response>\n")
    assert out.tool_calls == [2] and out.tool_successes == [1]
    assert max(out.step_ids[0]) == 2


def test_rows_run_their_calls_concurrently(tok) -> None:
    scripts = {f"Q{i}": [f"```python\nprint({i}*{i}+1)\n```", FINAL] for i in range(4)}
    scripts["Q4"] = [FINAL]  # a row without a call finishes in the first turn
    out, model = run_loop(tok, scripts)
    for i in range(4):
        obs = masked_text(tok, out.response_ids[i], out.loss_mask[i], 0)
        assert obs == f"\n```output\n{i * i + 1}\n```\n"
    assert out.tool_calls == [1, 1, 1, 1, 0] and out.tool_successes == [1, 1, 1, 1, 0]
    assert out.loss_mask[4] == [1] * len(out.response_ids[4]) and set(out.step_ids[4]) == {0}
    assert model.calls == 2  # one generate per turn for the whole batch, not per row


def test_budget_counts_observation_tokens(tok) -> None:
    n_call = len(tok(FENCED_CALL, add_special_tokens=False)["input_ids"])
    out, _ = run_loop(tok, {"Q": [FENCED_CALL, FINAL]}, budget=n_call + 3)
    assert len(out.response_ids[0]) == n_call + 3 and out.ended_with_eos == [False]
    assert out.loss_mask[0][n_call:] == [0, 0, 0]  # the observation, cut to fit


def test_fence_in_a_code_string_runs_the_whole_call(tok) -> None:
    call = '```python\nprint("```")\nprint(6*7)\n```'
    out, _ = run_loop(tok, {"Q": [call, FINAL]}, extra="\n```output\n999\n```")
    obs = masked_text(tok, out.response_ids[0], out.loss_mask[0], 0)
    assert obs == "\n```output\n```\n42\n```\n" and out.tool_successes == [1]
    assert masked_text(tok, out.response_ids[0], out.loss_mask[0], 1) == call + FINAL


def test_hermes_close_tag_in_a_code_string_runs_the_whole_call(tok) -> None:
    out, _ = run_loop(tok, {"Q": [hermes('print("</tool_call>")'), FINAL]}, fmt="hermes")
    obs = masked_text(tok, out.response_ids[0], out.loss_mask[0], 0)
    assert obs == "\n<tool_response>\n</tool_call>\n</tool_response>\n"
    assert out.tool_calls == [1] and out.tool_successes == [1]


def test_every_sandbox_limit_reaches_the_sandbox(tok, monkeypatch) -> None:
    seen: list[dict] = []

    def fake_batch(codes, **kwargs):
        seen.append(kwargs)
        return [ToolResult("408\n", "", ok=True, timed_out=False) for _ in codes]

    monkeypatch.setattr(tools_module, "run_python_batch", fake_batch)
    sandbox = SandboxConfig(timeout_s=3.5, memory_mb=99, disk_mb=7, max_processes=9,
                            max_output_bytes=1234, allow_unsandboxed=True)
    run_loop(tok, {"Q": [FENCED_CALL, FINAL]}, sandbox=sandbox)
    expected = {"timeout_s": 3.5, "memory_mb": 99, "disk_mb": 7, "max_processes": 9,
                "max_output_bytes": 1234, "allow_unsandboxed": True}
    assert seen and all(kwargs == expected for kwargs in seen)  # once per turn
    assert set(seen[0]) == {f.name for f in fields(SandboxConfig)}  # a new limit must be passed too


@pytest.mark.skipif(isolation_problem() is not None, reason="needs a working sandbox (bubblewrap)")
def test_output_over_the_cap_keeps_its_last_line(tok) -> None:
    code = 'print("x" * 70000)\nprint("ANSWER", 6*7)'  # over the 64 KiB default cap
    call = f"```python\n{code}\n```"
    out, _ = run_loop(tok, {"Q": [call, FINAL]}, budget=2000)
    obs = masked_text(tok, out.response_ids[0], out.loss_mask[0], 0)
    assert obs.endswith("\nANSWER 42\n```\n") and "truncated" in obs
    # a configured cap is the one applied: 2 KiB, so the whole observation stays near 2 KiB
    out, _ = run_loop(tok, {"Q": [call, FINAL]}, sandbox=SandboxConfig(max_output_bytes=2048),
                      max_output_chars=10**6, budget=20000)
    obs = masked_text(tok, out.response_ids[0], out.loss_mask[0], 0)
    assert obs.endswith("\nANSWER 42\n```\n") and 2048 <= len(obs) < 2048 + 200


# ----------------------------------------------------------------------------- rewards


def test_reward_reads_only_model_written_text(tok) -> None:
    prints_it = '```python\nprint(f"#### {6*7}")\n```'  # the interpreter states the answer
    scripts = {"Q0": [prints_it, "Done."], "Q1": ["```python\nprint(6*7)\n```", "#### 42"]}
    out, _ = run_loop(tok, scripts)
    decoded = [tok.decode(ids) for ids in out.response_ids]
    assert is_correct(decoded[0], "42")  # what the reward read before: the observation's "#### 42"
    scored = reward_texts(out, decoded, tok)
    assert scored == [prints_it + "\nDone.", "```python\nprint(6*7)\n```\n#### 42"]
    assert [is_correct(t, "42") for t in scored] == [False, True]


def test_model_written_text_drops_a_cut_observation(tok) -> None:
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    model, obs = enc("x = 1"), enc("\n```output\n#### 42")  # an observation cut by the budget
    assert model_written_text(tok, model + obs, [1] * len(model) + [0] * len(obs)) == "x = 1"
    assert model_written_text(tok, model + obs, None) == "x = 1\n```output\n#### 42"


def test_validation_accuracy_reads_only_model_written_text(tok) -> None:
    from lightning_opd.evaluation import evaluate_accuracy

    prints_it = '```python\nprint(f"#### {6*7}")\n```'
    examples = [Example("Q0", "42"), Example("Q1", "42")]
    scripts = {render_prompt(tok, "Q0"): [prints_it, "Done."],
               render_prompt(tok, "Q1"): [prints_it, "#### 42"]}
    model = ScriptedModel(tok, scripts, "```output")
    accuracy = evaluate_accuracy(model, tok, examples, None, max_new_tokens=200,
                                 tools=ToolsConfig(enabled=True))
    assert accuracy == 0.5


def test_stop_criterion_is_per_row(tok) -> None:
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [enc("ab") + enc(FENCED_CALL + "\n"), enc("ab") + enc("```python\nprint(1)")]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    stop = ToolCallStop(tok, "fenced", prompt_width=len(enc("ab")), budgets=[100, 100])
    assert stop(ids[:1], None).tolist() == [True]
    assert stop(ids[1:, : len(rows[1])], None).tolist() == [False]
    # the closing fence alone completes the call: no waiting for what the model writes next
    assert stop(ids[:1, :-len(enc("\n"))], None).tolist() == [True]
    assert ToolCallStop(tok, "fenced", 2, [1])(ids[1:, :3], None).tolist() == [True]  # budget


def test_real_hf_generate_accepts_the_criterion(tok, tiny_llama) -> None:
    model = tiny_llama(tok)
    prompts = [tok("What is 12*34?", add_special_tokens=False)["input_ids"]] * 2
    out = generate_with_tools(model, tok, prompts, RolloutConfig(max_new_tokens=12, samples_per_prompt=2),
                              ToolsConfig(enabled=True), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert len(out.response_ids) == 4 and out.prompt_index == [0, 0, 1, 1]
    for ids, mask, eos in zip(out.response_ids, out.loss_mask, out.ended_with_eos, strict=True):
        assert len(ids) + int(eos) <= 12 and len(mask) == len(ids)


# ----------------------------------------------------------------------------- arith_tool


def test_arith_tool_deterministic_and_right() -> None:
    cfg = DataConfig(source="arith_tool", val_size=50, seed=3)
    task, again = ArithToolTask(cfg), ArithToolTask(cfg)
    examples = [task.example(i) for i in range(200)]
    assert examples == [again.example(i) for i in range(200)]
    assert examples != [ArithToolTask(DataConfig(val_size=50, seed=4)).example(i) for i in range(200)]
    val = {ex.prompt for ex in task.validation_set()}
    assert len(val) == 50 and not val & {ex.prompt for ex in examples}
    for ex in examples:
        expr = ex.prompt.removeprefix("What is ").removesuffix("?")
        a = int(expr.split("*")[0])
        assert 100 <= a <= 9999 and ex.answer == str(eval(expr))  # noqa: S307 (our own digits)
        assert task.check(ex.solution, ex) and not task.check(f"#### {int(ex.answer) + 1}", ex)
        spans = observation_spans(ex.solution)
        assert [ex.solution[s:e] for s, e in spans] == [f"\n```output\n{ex.answer}\n```\n"]
        assert find_tool_call(ex.solution[: spans[0][0]], "fenced") == f"print({expr})\n"
    assert any("+" in ex.prompt for ex in examples) and any("+" not in ex.prompt for ex in examples)
    shard = ArithToolTask(cfg).stream(shard=1, num_shards=2, start=3)
    assert next(shard) == examples[7]


def test_arith_tool_traces_hold_real_sandbox_output() -> None:
    task = ArithToolTask(DataConfig(val_size=10))
    examples = [task.example(i) for i in range(5)]
    codes = [find_tool_call(ex.solution[: observation_spans(ex.solution)[0][0]], "fenced")
             for ex in examples]
    for ex, result in zip(examples, run_python_batch(codes), strict=True):
        assert result.ok
        observed = format_observation(result, "fenced", 256)
        start, end = observation_spans(ex.solution)[0]
        assert ex.solution[start:end] == observed


def test_tool_task_sft_masks_the_observation_out_of_the_labels(split_tokenizer) -> None:
    from lightning_opd.sft import sft_batch

    task = ArithToolTask(DataConfig(val_size=10))
    ex = task.example(0)
    # the SFT loop finds the spans on the task (sft.supervised_finetune uses the same lookup)
    spans_of = getattr(task, "observation_spans", None)
    assert spans_of is not None
    ids, _, labels = sft_batch(split_tokenizer, [ex], "cpu", spans_of)
    targets = labels[0][labels[0] != -100].tolist()
    text = split_tokenizer.decode(targets, skip_special_tokens=True)
    (start, end), = observation_spans(ex.solution)
    assert "```output" not in text  # the observation is input only
    assert text.replace(" ", "") == (ex.solution[:start] + ex.solution[end:]).replace(" ", "")
    # without the spans every solution token is a target
    _, _, unmasked = sft_batch(split_tokenizer, [ex], "cpu", None)
    assert int((unmasked[0] != -100).sum()) > len(targets)


class _ForcedCalls:
    """A real tiny causal LM whose first `len(script)` generate() calls (tool turns) begin with
    forced text: per turn, per response, the text to force (None: generate freely). After the
    forced text the model runs free, so what it writes after an observation depends on the
    KV cache being right."""

    def __init__(self, model, tok, script: list[list[str | None]]) -> None:
        self.model, self.tok, self.turn = model, tok, 0
        self.script = [[None if t is None else tok(t, add_special_tokens=False)["input_ids"]
                        for t in turn] for turn in script]
        self.training = False

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, input_ids, **kwargs):
        from transformers import LogitsProcessor, LogitsProcessorList

        forced = self.script[self.turn] if self.turn < len(self.script) else []
        width = input_ids.shape[1]
        self.turn += 1
        # forced turns come first, while every response is still in the batch: grid row = response
        rows = range(input_ids.shape[0])

        class Force(LogitsProcessor):
            def __call__(self, ids, scores):
                step = ids.shape[1] - width
                for b, row in enumerate(rows):
                    text = forced[row] if row < len(forced) else None
                    if text is not None and step < len(text):
                        scores[b] = -1e9
                        scores[b, text[step]] = 0.0
                return scores

        return self.model.generate(input_ids=input_ids, logits_processor=LogitsProcessorList([Force()]),
                                   **kwargs)



@pytest.mark.skipif(isolation_problem() is not None, reason="the calls run in the sandbox")
def test_reused_cache_gives_the_same_greedy_responses(tok) -> None:
    from lightning_opd.config import TinyModelConfig
    from lightning_opd.models import tiny_model

    torch.manual_seed(0)
    model = tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok).eval()
    with torch.no_grad():  # large random weights: free text that depends on all of its context
        for weight in (p for p in model.parameters() if p.dim() > 1):
            weight.normal_(0, 0.3)
    call = "```python\nprint(12*34)\n```"
    # turn 0: every response calls; turn 1: response 1 calls again, the others run free; then free
    script = [[call, call, call], [None, call, None]]
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("What is 12*34?", "12", "import time")]
    outs = {}
    for reuse in (True, False):
        tools = ToolsConfig(enabled=True, reuse_cache=reuse)
        forced = _ForcedCalls(model, tok, script)
        outs[reuse] = generate_with_tools(forced, tok, prompts, RolloutConfig(max_new_tokens=60), tools,
                                          eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, greedy=True)
    cached, refed = outs[True], outs[False]
    assert cached.tool_calls == refed.tool_calls == [1, 2, 1]
    assert cached.ended_with_eos == refed.ended_with_eos == [True, False, False]  # one leaves early
    assert cached.response_ids == refed.response_ids
    assert cached.loss_mask == refed.loss_mask and cached.step_ids == refed.step_ids
    # the free tokens after each observation are really there (and so came through the cache)
    assert all(m[-1] == 1 and sum(m) > 30 for m in cached.loss_mask)
