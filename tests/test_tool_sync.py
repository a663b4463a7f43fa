"""Tool rollouts on two CPU processes (gloo) with the student sharded by FSDP2, as under
`trainer.strategy=fsdp`: one rank's response needs three turns (two tool calls), the other's
one, and the tool loop keeps the ranks in step (rollout/tools.py, "Sharded models") instead of
hanging in the first forward pass that only one rank makes.

The model is a real tiny Llama, `fully_shard`-ed per decoder layer and at the root with
`strategy.shard_model` (so each forward all-gathers parameters: a collective), whose logits are
overridden by a script: per prompt, the text of each turn. Which turn a row is in is read off
its content (the observations so far), so the script needs no bookkeeping across calls. The
sandbox is replaced by a stub (the synchronisation does not depend on what the code prints).

Run as a script, this file is the launcher: `python tests/test_tool_sync.py TOKENIZER_DIR OUT_DIR
PORT` spawns the two ranks, which write what they saw to OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240  # a deadlock fails the test here instead of hanging it
WORLD = 2
CALL = "Let me compute.\n```python\nprint(12*34)\n```"
MARKER = "```output"  # starts every (fenced) observation
LONG = {"What is 12*34?": [CALL, CALL, "#### 408"]}  # two calls: three turns
SHORT = {"What is 1+1?": ["#### 2"]}  # answers at once: one turn
CORPUS = [CALL, "#### 408", "#### 2", "```output\n408\n```", "What is 12*34?", "What is 1+1?"] * 20


class ScriptedLM:
    """A sharded causal LM whose sampled tokens follow a script: per prompt, the text of each
    turn; turn k (k = observations in the row so far) is forced token by token, then EOS. Rows
    that match no prompt (the idle one-token batch) generate freely. Every forward pass is the
    real model's, so under FSDP each one is a collective. Counts the generate calls."""

    def __init__(self, model, tok, scripts: dict[str, list[str]]) -> None:
        self.model, self.tok, self.training, self.generate_calls = model, tok, False, 0
        self.scripts = {tuple(self.encode(p)): turns for p, turns in scripts.items()}

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def parameters(self):
        return self.model.parameters()

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        return self

    def _turn_tokens(self, row: list[int]) -> list[int] | None:
        """The tokens this row must write in the current turn, None for a row without a script."""
        ids = [t for t in row if t != self.tok.pad_token_id]  # left pads and the holes' pads
        prompt = next((p for p in self.scripts if tuple(ids[: len(p)]) == p), None)
        if prompt is None:
            return None
        turns = self.scripts[prompt]
        k = self.tok.decode(ids[len(prompt) :]).count(MARKER)
        return self.encode(turns[min(k, len(turns) - 1)]) + [self.tok.eos_token_id]

    def generate(self, input_ids, **kwargs):
        from transformers import LogitsProcessor, LogitsProcessorList

        self.generate_calls += 1
        width = input_ids.shape[1]
        forced = [self._turn_tokens(row) for row in input_ids.tolist()]

        class Force(LogitsProcessor):
            def __call__(self, ids, scores):
                step = ids.shape[1] - width
                for b, text in enumerate(forced):
                    if text is not None:
                        scores[b] = -1e9
                        scores[b, text[min(step, len(text) - 1)]] = 0.0
                return scores

        return self.model.generate(input_ids=input_ids, logits_processor=LogitsProcessorList([Force()]), **kwargs)


def _fake_sandbox(codes: list[str], **_) -> list:
    from lightning_opd.rollout.sandbox import ToolResult

    return [ToolResult(stdout="408\n", stderr="", ok=True, timed_out=False) for _ in codes]


def _rank(rank: int, tok_dir: str, out_dir: str, port: int) -> None:
    """One rank: shard a tiny Llama over both ranks, then run tool rollouts in which this rank
    takes three turns and the other one, and the other way round, with and without the cache."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import PreTrainedTokenizerFast

    from lightning_opd.config import Config, RolloutConfig, TinyModelConfig, ToolsConfig
    from lightning_opd.models import tiny_model
    from lightning_opd.rollout import tools as tools_module
    from lightning_opd.strategy import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank left waiting in a collective fails after this long rather than hanging for 30 min
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        model = tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                           tok, seed=0)
        shard_model(model, init_device_mesh("cpu", (WORLD,)), Config(), on_gpu=False)
        forwards = [0]
        model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        tools_module.run_python_batch = _fake_sandbox
        results = []
        for reuse_cache in (True, False):
            for long_rank in (0, 1):
                scripts = LONG if rank == long_rank else SHORT
                lm = ScriptedLM(model, tok, scripts)
                before = forwards[0]
                out = tools_module.generate_with_tools(
                    lm, tok, [lm.encode(p) for p in scripts], RolloutConfig(max_new_tokens=200),
                    ToolsConfig(enabled=True, reuse_cache=reuse_cache), eos_id=tok.eos_token_id,
                    pad_id=tok.pad_token_id, greedy=True, synced_gpus=True,
                )
                results.append({
                    "reuse_cache": reuse_cache, "long": rank == long_rank, "tool_calls": out.tool_calls,
                    "ended_with_eos": out.ended_with_eos, "generate_calls": lm.generate_calls,
                    "forwards": forwards[0] - before,
                    "text": tools_module.model_written_text(tok, out.response_ids[0], out.loss_mask[0]),
                })
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # neither rank tears its group down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's worker threads can still be alive when C++
    # statics are destroyed, which aborts the process now and then ("terminate called without an
    # active exception", seen once in CI) after all the work above was done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_ranks_with_different_tool_turns_stay_in_step(tmp_path):
    from lightning_opd.config import TokenizerConfig
    from lightning_opd.models import train_tokenizer

    # one tokenizer for both ranks (the model is sized to it, and its shards must agree)
    train_tokenizer(CORPUS, TokenizerConfig(digits="split", vocab_size=60), teacher=False).save_pretrained(
        tmp_path / "tok")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, __file__, str(tmp_path / "tok"), str(tmp_path), str(_free_port())]
    try:
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the 2-process rollout did not finish in {TIMEOUT_S} s (deadlock?): {str(err.stderr)[-2000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for run in zip(*ranks, strict=True):
        long, short = (run[0], run[1]) if run[0]["long"] else (run[1], run[0])
        assert long["tool_calls"] == [2] and short["tool_calls"] == [0]  # three turns against one
        assert long["ended_with_eos"] == short["ended_with_eos"] == [True]
        assert long["text"].endswith("#### 408") and short["text"] == "#### 2"
        # the finished rank joined every turn of the other (one idle call for each of its two
        # extra turns), and every forward pass of it
        assert long["generate_calls"] == 3 and short["generate_calls"] == 3
        assert long["forwards"] == short["forwards"] > 0


if __name__ == "__main__":
    import torch.multiprocessing as mp

    tok_dir, out_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mp.spawn(_rank, args=(tok_dir, out_dir, port), nprocs=WORLD, join=True)
