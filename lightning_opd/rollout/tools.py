"""Tool-integrated rollouts: the student calls a Python interpreter while it answers (DESIGN §5).

A tool call is either a fenced block (``fmt="fenced"``) or a Hermes call (``fmt="hermes"``,
Qwen-style templates):

    ```python                      <tool_call>
    print(12*34)                   {"name": "code_interpreter", "arguments": {"code": "print(12*34)"}}
    ```                            </tool_call>

The closing marker completes the call:

- fenced: opened by ```python, ```py, ```python3 or ```py3 (any case), closed by the first ```
  that starts a line, so a ``` inside the code (print("```")) closes nothing. The closing fence
  completes the call at once, whatever follows it: models trained on traces whose observation
  is masked out of the labels have never learned what comes after it (measured: waiting for
  the line's end let such a model write ```python there and lose every call). A code line
  that itself starts with ``` (inside a multi-line string) would end the call early.
- Hermes: closed by the first </tool_call> outside a JSON string literal, so a code string may
  hold the tag; if the finished turn has none, its first </tool_call> closes a malformed call.

Its code runs in the sandbox (`sandbox.run_python_batch`, untrusted code, never raising, with
every limit of `tools.sandbox`; the sandbox keeps the head and tail of an output over
`max_output_bytes`, as the result is usually printed last) and the output, middle-truncated to
`max_output_chars`, comes back wrapped as an observation: "\\n```output\\n{obs}\\n```\\n" or
"\\n<tool_response>\\n{obs}\\n</tool_response>\\n". A malformed Hermes call (bad JSON, unknown tool,
no code) gets an observation saying what is wrong instead of a run. Rewards read only the text
the model wrote (`reward_texts`): an answer printed by the interpreter earns nothing.

`generate_with_tools` runs the turns batch-parallel: every active response generates (HF generate
via `generate.generate`, with a stopping criterion that ends a response at its first complete
call or at its own token budget); responses that stopped at a call have their calls run
concurrently, the observation tokens appended, and resume. A response is

    [model turn 0][observation][model turn 1][observation] ... [model turn K]  (EOS excluded)

with loss_mask 1 on model tokens, 0 on observations, and step ids 0, 1, ..., K on the model
turns (-1 on observations): the SOD steps of `weighting.py`. The budget `max_new_tokens` counts
all response tokens (model + observation + EOS). A response stops at EOS, when its budget is spent
(an observation is cut to fit), or at a call beyond `max_turns` (kept, not run).

The KV cache is carried across turns (`_TurnGrid`): a turn feeds only the observation and the
last sampled token, not the whole prompt and response again (the re-feed cost 11-27% of a
multi-turn rollout on CPU, docs/performance.md). `tools.reuse_cache=false` re-feeds every turn.

Sharded models (`synced_gpus`, FSDP with more than one rank): every forward pass is a collective,
so every rank must run the same number of forwards, though each rank's responses need their own
number of turns. Each turn therefore starts with an all-reduce (MAX) of "this rank still has an
active response"; while any rank has one, a rank whose responses have all finished runs the same
`generate` call on a dummy one-token batch and discards it (`_idle_turn`), and every call passes
`synced_gpus=True`, so that within a turn ranks that stop early keep stepping until all have.
Without `synced_gpus` (one process, or DDP, whose rollouts use the unwrapped model) there is no
collective and the loop is exactly the single-process one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lightning_opd.config import RolloutConfig, SandboxConfig, ToolsConfig
from lightning_opd.rollout.generate import (
    Rollout,
    generate,
    left_pad,
    rollout_threads,
    sampling_kwargs,
)
from lightning_opd.rollout.sandbox import ToolResult, run_python_batch

FORMATS = ("fenced", "hermes")
TOOL_NAME = "code_interpreter"
# A fenced call opens with ```python / ```py / ```python3 / ```py3 (any case) and closes at the
# first ``` that starts a line: a ``` inside the code, as in print("```"), closes nothing.
# Group 1 is the body.
_FENCED = re.compile(r"```(?:python3?|py3?)[ \t]*\n(.*?)^```", re.DOTALL | re.MULTILINE | re.I)
_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_CLOSE = {"fenced": "```", "hermes": _HERMES_CLOSE}
_WRAP = {
    "fenced": ("\n```output\n", "\n```\n"),
    "hermes": ("\n<tool_response>\n", "\n</tool_response>\n"),
}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"tool call format {fmt!r} is not one of {list(FORMATS)}")


# --- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call: its code, or (malformed) why it cannot run."""

    code: str | None  # None when malformed
    error: str | None = None  # sent back as the observation of a malformed call
    end: int = 0  # character offset right after the closing marker


def _decode_body(body: str, fmt: str, end: int) -> ToolCall:
    if fmt == "fenced":
        return ToolCall(body, None, end)
    try:
        call = json.loads(body)
    except json.JSONDecodeError as err:
        return ToolCall(None, f"Error: the tool call is not valid JSON ({err.msg} at "
                              f"line {err.lineno} column {err.colno}).", end)
    args = call.get("arguments") if isinstance(call, dict) else None
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            args = None
    if not isinstance(call, dict) or call.get("name") != TOOL_NAME:
        name = call.get("name") if isinstance(call, dict) else None
        return ToolCall(None, f"Error: unknown tool {name!r}; the only tool is {TOOL_NAME!r}.", end)
    if not isinstance(args, dict) or not isinstance(args.get("code"), str):
        return ToolCall(None, 'Error: the call needs "arguments": {"code": "<python code>"}.', end)
    return ToolCall(args["code"], None, end)


def _hermes_close(text: str, start: int, streaming: bool) -> int | None:
    """Where the Hermes call whose body starts at `start` closes: the first </tool_call> that is
    not inside a JSON string literal (so a code string may hold the tag). When the text is
    final and every </tool_call> lies inside an unterminated string, the first one closes a
    malformed call (the model gets an error instead of silence); while the text may still
    grow, such a call is not complete yet."""
    in_string = escaped = False
    for pos in range(start, len(text)):
        char = text[pos]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif text.startswith(_HERMES_CLOSE, pos):
            return pos
    if streaming:
        return None
    first = text.find(_HERMES_CLOSE, start)
    return None if first < 0 else first


def _hermes_calls(text: str, streaming: bool) -> Iterator[tuple[str, int]]:
    pos = 0
    while (opening := text.find(_HERMES_OPEN, pos)) >= 0:
        body = opening + len(_HERMES_OPEN)
        close = _hermes_close(text, body, streaming)
        if close is None:
            return
        pos = close + len(_HERMES_CLOSE)
        yield text[body:close], pos


def _calls(text: str, fmt: str, streaming: bool) -> Iterator[ToolCall]:
    """The complete calls in `text`, left to right, as generation would stop at them.
    streaming: the text may still grow (a stopping criterion's view), so a Hermes call whose
    every </tool_call> lies inside a string is not complete yet."""
    _check_format(fmt)
    if fmt == "fenced":
        spans = ((m.group(1), m.end()) for m in _FENCED.finditer(text))
    else:
        spans = _hermes_calls(text, streaming)
    for body, end in spans:
        yield _decode_body(body, fmt, end)


def first_tool_call(text: str, fmt: str, *, streaming: bool = False) -> ToolCall | None:
    """The first complete call anywhere in `text` (where generation should have stopped)."""
    return next(_calls(text, fmt, streaming), None)


def parse_tool_call(text: str, fmt: str) -> ToolCall | None:
    """The complete call that ends `text` (trailing whitespace allowed), else None."""
    end = len(text.rstrip())
    return next((call for call in _calls(text, fmt, False) if call.end == end), None)


def find_tool_call(text: str, fmt: str) -> str | None:
    """The code of the complete call at the end of `text`; None if there is none, or if it is
    malformed (use `parse_tool_call` for the error message)."""
    call = parse_tool_call(text, fmt)
    return None if call is None else call.code


# --- observations ----------------------------------------------------------------------------


def middle_truncate(s: str, n: int) -> str:
    """`s` cut to at most n characters by removing its middle: head + "…[truncated K chars]…" +
    tail, the marker counted in n. If n cannot even hold the marker, a plain prefix."""
    if len(s) <= n:
        return s
    cut = len(s) - n
    for _ in range(3):  # the marker's length depends on the digits of the count it states
        marker = f"…[truncated {cut} chars]…"
        keep = n - len(marker)
        if keep < 0:
            return s[:n]
        cut = len(s) - keep
    head = (keep + 1) // 2
    return s[:head] + marker + s[len(s) - (keep - head):]


def wrap_observation(obs: str, fmt: str) -> str:
    """An observation in the model's format (the exact text appended to the response)."""
    _check_format(fmt)
    opening, closing = _WRAP[fmt]
    return f"{opening}{obs}{closing}"


def format_observation(result: ToolResult, fmt: str, max_chars: int) -> str:
    """stdout (plus stderr and the error when the run failed), middle-truncated, wrapped."""
    parts = [result.stdout]
    if not result.ok:
        parts += [result.stderr, f"Error: {result.error}" if result.error else ""]
    obs = "\n".join(p.rstrip("\n") for p in parts if p.strip())
    return wrap_observation(middle_truncate(obs, max_chars), fmt)


def observation_spans(text: str, fmt: str = "fenced") -> list[tuple[int, int]]:
    """Character spans [start, end) of the wrapped observations in `text` (for SFT masking)."""
    _check_format(fmt)
    opening, closing = (re.escape(m) for m in _WRAP[fmt])
    return [m.span() for m in re.finditer(f"{opening}.*?{closing}", text, re.DOTALL)]


def model_written_text(tokenizer, response_ids: list[int], loss_mask: list[int] | None, *,
                       skip_special_tokens: bool = False) -> str:
    """The text the model itself wrote: the response with its observations removed.

    response_ids, loss_mask: one response of a Rollout (T,) each; mask 0 marks observation tokens
    (None: no observations). Each run of model tokens is decoded on its own and the runs are
    joined by a newline, as an observation starts and ends a line. Read from the mask, not
    from `observation_spans`: an observation cut by the budget, or one whose output contains
    its own closing fence, would fool a text search.
    """
    if loss_mask is None or all(loss_mask):
        return tokenizer.decode(response_ids, skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)
    runs, current = [], []
    for token, keep in zip(response_ids, loss_mask, strict=True):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return "\n".join(tokenizer.decode(run, skip_special_tokens=skip_special_tokens,
                                      clean_up_tokenization_spaces=False) for run in runs)


def reward_texts(rollout: Rollout, texts: list[str], tokenizer, *,
                 skip_special_tokens: bool = False) -> list[str]:
    """The texts to score: `texts[b]` (the response as decoded by the caller) for a response without
    observations, else its model-written text, so that an answer printed by the interpreter
    (code running print("#### 42")) earns nothing; the model must state it."""
    masks = rollout.loss_mask or [None] * len(texts)
    return [
        text if mask is None or all(mask) else
        model_written_text(tokenizer, ids, mask, skip_special_tokens=skip_special_tokens)
        for text, ids, mask in zip(texts, rollout.response_ids, masks, strict=True)
    ]


# --- the loop --------------------------------------------------------------------------------


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _call_cut(tokenizer, tokens: list[int], fmt: str) -> tuple[int, ToolCall] | None:
    """(n, call): the first call of the turn `tokens` and the fewest tokens tokens[:n] whose text
    reaches its closing marker. The call is read off the whole turn (its text is final: the
    turn is over), so tokens generated after the marker in the same step fall after the cut. Binary search, O(log T) decodes."""
    text = _decode(tokenizer, tokens)
    call = first_tool_call(text, fmt)
    if call is None:
        return None
    through_call = text[: call.end]
    lo, hi = 1, len(tokens)
    while lo < hi:  # a prefix's text grows with n, so "reaches the marker" is monotone
        mid = (lo + hi) // 2
        if _decode(tokenizer, tokens[:mid]).startswith(through_call):
            hi = mid
        else:
            lo = mid + 1
    return lo, call


def sandbox_kwargs(cfg: SandboxConfig) -> dict[str, Any]:
    """`run_python_batch`'s limits from the config, every one of them (a limit left out would
    silently fall back to the sandbox's default)."""
    return {
        "timeout_s": cfg.timeout_s,
        "memory_mb": cfg.memory_mb,
        "disk_mb": cfg.disk_mb,
        "max_processes": cfg.max_processes,
        "max_output_bytes": cfg.max_output_bytes,
        "allow_unsandboxed": cfg.allow_unsandboxed,
    }


class ToolCallStop(StoppingCriteria):
    """Ends a response of HF generate at its first complete tool call or at its own token budget.

    Sequences are left-padded to `prompt_width`, so new tokens are input_ids[:, prompt_width:].
    Each step decodes only the last few tokens of each response; its whole new text only when
    the closing marker shows up there. The text is read as still growing, so a
    </tool_call> inside a JSON string stops nothing. Returns a (B,) bool tensor, as HF expects.
    """

    def __init__(self, tokenizer, fmt: str, prompt_width: int, budgets: list[int]) -> None:
        _check_format(fmt)
        self.tokenizer, self.fmt, self.width, self.budgets = tokenizer, fmt, prompt_width, budgets
        self.tail = 2 * len(_CLOSE[fmt]) + 4  # tokens; enough to hold the marker

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.width :]  # (B, n)
        n = new.shape[1]
        done = torch.zeros(new.shape[0], dtype=torch.bool)
        for b, tail in enumerate(new[:, -self.tail :].tolist()):
            if n >= self.budgets[b]:
                done[b] = True
            elif _CLOSE[self.fmt] in _decode(self.tokenizer, tail):
                text = _decode(self.tokenizer, new[b].tolist())
                done[b] = first_tool_call(text, self.fmt, streaming=True) is not None
        return done.to(input_ids.device)


class _TurnGrid:
    """The active responses' tokens as one left-padded grid, carried from turn to turn with the
    model's KV cache, so that a turn feeds only what is new (the observation and the last
    sampled token) instead of the whole prompt and response again.

    Tokens a turn generated but the loop cut off (after a call's closing marker, past a
    response's budget, the padding of a response that stopped early) stay in the grid and in the
    cache but get attention mask 0; so do the pads that right-align each response's
    observation. HF derives position ids from the mask (cumsum), so a hole changes nothing
    for the tokens after it: the output equals a clean re-feed (tests/test_tools.py checks
    greedy equality with `tools.reuse_cache=false`, which rebuilds the grid from the kept
    tokens alone every turn, without holes or cache).
    """

    def __init__(self, prompts: list[list[int]], pad_id: int, device) -> None:
        ids, mask = left_pad(prompts, pad_id)
        self.ids, self.mask, self.pad_id, self.cache = ids.to(device), mask.to(device), pad_id, None

    def generate(self, model, stop: StoppingCriteria, max_new: int, sampling: dict[str, Any],
                 eos_id: int, reuse_cache: bool, synced_gpus: bool = False) -> torch.Tensor:
        """One turn for every row of the grid; returns the new columns (B, n)."""
        width = self.ids.shape[1]
        out = model.generate(
            input_ids=self.ids, attention_mask=self.mask, cache=self.cache if reuse_cache else None,
            max_new_tokens=max_new, eos_token_id=eos_id, pad_token_id=self.pad_id, use_cache=True,
            stopping_criteria=StoppingCriteriaList([stop]), return_dict_in_generate=True,
            **sampling, **_synced(synced_gpus),
        )
        sequences = getattr(out, "sequences", out)  # (B, width + n)
        self.cache = getattr(out, "cache", None) if reuse_cache else None
        self.mask = torch.cat([self.mask, torch.zeros_like(sequences[:, width:])], 1)
        self.ids = sequences
        return sequences[:, width:]

    def keep(self, row: int, start: int, count: int) -> None:
        """Attend to `count` tokens of `row` from grid column `start` (what the loop kept)."""
        self.mask[row, start : start + count] = 1

    def next_turn(self, rows: list[int], appended: list[list[int]]) -> None:
        """Keep only `rows` (grid rows, in order) and append each one's tokens right-aligned."""
        index = torch.tensor(rows, dtype=torch.long, device=self.ids.device)
        self.ids, self.mask = self.ids[index], self.mask[index]
        if self.cache is not None:
            self.cache.batch_select_indices(index)
        block, block_mask = left_pad(appended, self.pad_id)
        self.ids = torch.cat([self.ids, block.to(self.ids.device)], 1)
        self.mask = torch.cat([self.mask, block_mask.to(self.mask.device)], 1)


def _synced(synced_gpus: bool) -> dict[str, bool]:
    """generate()'s `synced_gpus` argument, passed only when set: without it the call is exactly
    the single-process one (HF's own default is off for models sharded by `fully_shard`)."""
    return {"synced_gpus": True} if synced_gpus else {}


def _any_rank_active(active: bool, synced_gpus: bool, device: torch.device) -> bool:
    """Whether another turn is needed: this rank's `active` alone, or, with `synced_gpus`, whether
    any rank still has an active response (all-reduce MAX; every rank calls it once per turn,
    so all ranks take the same number of turns and leave the loop together)."""
    if not synced_gpus:
        return active
    flag = torch.tensor([int(active)], dtype=torch.long, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _idle_turn(model, eos_id: int, pad_id: int, device: torch.device) -> None:
    """A rank whose responses have all finished, while another rank's have not, joins that rank's
    turn: the same `generate` call (synced, so it keeps stepping as long as any rank does) on a
    one-token batch, greedy so that it draws nothing from the RNG; the output is discarded."""
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, eos_token_id=eos_id,
                   pad_token_id=pad_id, use_cache=True, do_sample=False, synced_gpus=True)


@torch.no_grad()
def generate_with_tools(
    model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]], rollout_cfg: RolloutConfig,
    tools_cfg: ToolsConfig, *, eos_id: int, pad_id: int, greedy: bool = False, synced_gpus: bool = False,
) -> Rollout:
    """Sample responses that may call the interpreter (see the module docstring).

    Each prompt is answered `samples_per_prompt` times (greedy: once). Returns a Rollout
    with loss_mask, step_ids, tool_calls and tool_successes filled, aligned with response_ids.
    synced_gpus: the model is sharded over ranks (FSDP): every rank must call this the same
    number of times, and the ranks take the same number of turns (module docstring); needs an
    initialised torch.distributed process group.
    """
    fmt, budget = tools_cfg.format, rollout_cfg.max_new_tokens
    _check_format(fmt)
    n = 1 if greedy else rollout_cfg.samples_per_prompt
    prompts = [p for p in prompt_ids for _ in range(n)]
    index = [i for i in range(len(prompt_ids)) for _ in range(n)]
    n_responses = len(prompts)
    resp: list[list[int]] = [[] for _ in range(n_responses)]
    mask: list[list[int]] = [[] for _ in range(n_responses)]
    steps: list[list[int]] = [[] for _ in range(n_responses)]
    calls, successes, ended = [0] * n_responses, [0] * n_responses, [False] * n_responses
    sampling = sampling_kwargs(rollout_cfg, greedy)
    active = [i for i in range(n_responses) if budget > 0]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        grid = _TurnGrid([prompts[i] for i in active], pad_id, device) if active else None
        while _any_rank_active(bool(active), synced_gpus, device):
            if not active:  # this rank is done, another is not: join its forward passes (FSDP)
                _idle_turn(model, eos_id, pad_id, device)
                continue
            room = [budget - len(resp[i]) for i in active]  # tokens each response may still add
            width = grid.ids.shape[1]
            stop = ToolCallStop(tokenizer, fmt, width, room)
            new_columns = grid.generate(model, stop, max(room), sampling, eos_id, tools_cfg.reuse_cache,
                                        synced_gpus)
            pending: list[tuple[int, int, ToolCall]] = []  # (grid row, response, call)
            for j, i in enumerate(active):
                new = new_columns[j].tolist()
                eos = eos_id in new
                new, call = new[: new.index(eos_id)] if eos else new, None
                cut = _call_cut(tokenizer, new, fmt)
                if cut is not None and cut[0] < room[j]:  # a call, with room left for its output
                    (length, call), eos = cut, False
                    new = new[:length]
                elif len(new) + int(eos) > room[j]:  # the batch's max_new_tokens exceeds this response's
                    new, eos = new[: room[j]], False
                grid.keep(j, width, len(new))
                resp[i] += new
                mask[i] += [1] * len(new)
                steps[i] += [calls[i]] * len(new)  # turn k = k observations so far
                ended[i] = eos
                if call is not None and calls[i] < tools_cfg.max_turns:
                    pending.append((j, i, call))
                # otherwise the response is done: EOS, budget spent, or a call over max_turns (not run)

            runnable = [(i, c.code) for _, i, c in pending if c.code is not None]
            outputs = run_python_batch([code for _, code in runnable], **sandbox_kwargs(tools_cfg.sandbox))
            results = dict(zip([i for i, _ in runnable], outputs, strict=True))
            active, rows, appended = [], [], []
            for j, i, call in pending:
                if call.code is None:
                    error = middle_truncate(call.error or "", tools_cfg.max_output_chars)
                    text = wrap_observation(error, fmt)
                else:
                    text = format_observation(results[i], fmt, tools_cfg.max_output_chars)
                    successes[i] += int(results[i].ok)
                calls[i] += 1
                obs = tokenizer(text, add_special_tokens=False)["input_ids"][: budget - len(resp[i])]
                resp[i] += obs
                mask[i] += [0] * len(obs)
                steps[i] += [-1] * len(obs)
                if len(resp[i]) < budget:
                    active.append(i)
                    rows.append(j)
                    appended.append(obs)
            if active and tools_cfg.reuse_cache:
                grid.next_turn(rows, appended)
            elif active:  # the plain way, and the reference the cached one is tested against
                grid = _TurnGrid([prompts[i] + resp[i] for i in active], pad_id, grid.ids.device)
    finally:
        model.train(was_training)
    return Rollout(prompts, resp, ended, index, loss_mask=mask, step_ids=steps,
                   tool_calls=calls, tool_successes=successes)


def sample_responses(model, tokenizer, prompt_ids: list[list[int]], rollout_cfg: RolloutConfig,
                     tools_cfg: ToolsConfig | None, *, greedy: bool = False,
                     synced_gpus: bool = False) -> Rollout:  # fmt: skip
    """The one place that picks the rollout: with the interpreter when `tools_cfg.enabled`,
    else plain `generate` (training and validation both come through here); a colocated vLLM
    engine when `rollout.engine=vllm` (GPU only, see vllm_engine.py). HF rollouts of a model on
    the CPU run with `rollout.cpu_threads` torch threads (`generate.rollout_threads`)."""
    if rollout_cfg.engine == "vllm":
        from lightning_opd.rollout.vllm_engine import vllm_sample

        return vllm_sample(model, tokenizer, prompt_ids, rollout_cfg, tools_cfg, greedy=greedy)
    ids = {"eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    with rollout_threads(rollout_cfg, model):
        if tools_cfg is not None and tools_cfg.enabled:
            return generate_with_tools(model, tokenizer, prompt_ids, rollout_cfg, tools_cfg, greedy=greedy,
                                       synced_gpus=synced_gpus, **ids)
        return generate(model, prompt_ids, rollout_cfg, greedy=greedy, synced_gpus=synced_gpus, **ids)
