"""`lightning-opd plan`: the per-device memory estimate (lightning_opd/cli/plan.py).

A tiny config is computed by hand, part by part; FSDP divides what it shards; the advice for a
run that does not fit is checked to fit; the paper configs plan offline from the built-in table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_opd.cli import plan
from lightning_opd.cli.main import main
from lightning_opd.config import TinyModelConfig, load

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "configs" / "experiment" / "default.yaml"
PAPER_CONFIGS = ["simct_qwen7b_gemma2b", "simct_qwen7b_phi4mini", "simct_phi4mini_gemma2b", "sod_qwen3"]
# a 2x64 Llama-style student (vocabulary 60 merges + 256 bytes + 4 specials = 320) and a 2x64
# Qwen2-style teacher (160 + 256 + 3 = 419), fp32 on the CPU, 4 prompts, 16 new tokens
TINY = [
    "trainer.accelerator=cpu", "data.batch_size=4", "rollout.max_new_tokens=16",
    "student.tiny.hidden_size=64", "student.tiny.num_layers=2", "student.tiny.num_heads=2",
    "student.tiny.intermediate_size=256", "teacher.tiny.hidden_size=64", "teacher.tiny.num_layers=2",
    "teacher.tiny.num_heads=2", "teacher.tiny.intermediate_size=256",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_hf_cache(tmp_path, monkeypatch):
    """Plan offline from an empty HF cache, so hub ids resolve to the built-in table."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))


def tiny_plan(*overrides: str, gpu_memory: float = 80.0) -> plan.Plan:
    return plan.make_plan(load(DEFAULT, overrides=[*TINY, *overrides]), gpu_memory, prompt_tokens=8)


def test_tiny_config_by_hand():
    p = tiny_plan()
    s, parts = p.setting, p.parts
    assert (s.student.vocab, s.teacher.vocab) == (320, 419)
    # parameters: per layer q,k,v,o 4·64·64 + MLP 3·64·256 + 2 norms of 64 (+ Qwen2's q,k,v biases 3·64)
    layer = 4 * 64 * 64 + 3 * 64 * 256 + 2 * 64
    assert plan.parameters(s.student) == 2 * layer + 320 * 64 + 64 == 151_872
    assert plan.parameters(s.teacher) == 2 * (layer + 3 * 64) + 419 * 64 + 64 == 158_592
    # fp32 everywhere; S = 4 sequences of T = 8 + 16 = 24 tokens; N = 64 response positions
    S, T, N = 4, 24, 64
    assert parts.student_weights == parts.student_grads == 151_872 * 4
    assert parts.optimizer_state == 2 * 151_872 * 4
    assert parts.teacher_weights == 158_592 * 4
    assert parts.ddp_buckets == parts.fsdp_gathered == parts.cuda_reserve == parts.vllm_pool == 0
    kv_cache = 2 * 2 * 64 * S * T * 4  # 2 · layers · kv width · sequences · tokens · 4 bytes
    mask = S * T * T * 4
    assert parts.rollout_kv_cache == kv_cache == 98_304
    # teacher: one layer's working set 4·(2·64 + 3·256), the mask, the padded output (scoring
    # keeps no KV cache: response_logits passes use_cache=False)
    assert parts.teacher_scoring == S * T * 4 * (2 * 64 + 3 * 256) + mask + S * 17 * 419 * 4 == 467_248
    assert parts.teacher_logits == N * 419 * 4
    assert parts.student_logits == N * 320 * 4
    assert parts.student_logits_grad == 2 * N * 320 * 4
    assert parts.loss == 8 * N * 320 * 4  # 8 float32 (rows, U) tensors, 64 rows in one chunk, U ≤ 320
    # per layer and token: 2 norms · (4 + 2·4)·64 + 4·(5·64 + 4·256) = 6,912 bytes
    per_layer = S * T * (2 * 12 * 64 + 4 * (5 * 64 + 4 * 256))
    outside = S * T * 8 * 64 + N * 4 * 64 + mask  # final norm, the head's input, the mask
    assert parts.activations_no_checkpointing == 2 * per_layer + outside == 1_401_856
    assert parts.activations_checkpointed == S * T * 2 * 64 * 4 + per_layer + outside == 787_456
    assert parts.activations == parts.activations_no_checkpointing  # checkpointing needs fsdp
    assert parts.held == 4 * 151_872 * 4 + 158_592 * 4 == 3_064_320
    assert parts.phases == {"rollout": 98_304, "teacher scoring": 467_248 + N * 419 * 4,
                            "training": N * 419 * 4 + N * 320 * 4 * 3 + 655_360 + 1_401_856}  # fmt: skip
    assert parts.total == 3_064_320 + 2_410_240 and parts.peak_phase == "training"
    assert p.fits and not p.suggestions


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_parameter_count_matches_the_built_model(arch):
    from lightning_opd.models import tiny_model

    class Vocabulary:  # what tiny_model reads of a tokenizer
        eos_token_id, pad_token_id, bos_token_id = 0, 1, None

        def __len__(self) -> int:
            return 320

    cfg = TinyModelConfig(arch=arch, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96)
    model = tiny_model(cfg, Vocabulary())
    shape = plan.ModelShape("t", hidden=64, layers=3, heads=4, kv_heads=4, head_dim=16, intermediate=96, vocab=320,
                            tied=True, qkv_bias=arch == "qwen2")  # fmt: skip
    assert plan.parameters(shape) == sum(p.numel() for p in model.parameters())


def test_published_models_have_their_published_sizes():
    billions = {"Qwen/Qwen2.5-7B-Instruct": 7.62, "microsoft/Phi-4-mini-instruct": 3.84, "google/gemma-2-2b-it": 2.61,
                "Qwen/Qwen3-4B": 4.02, "Qwen/Qwen3-1.7B": 1.72, "Qwen/Qwen3-0.6B": 0.60}  # fmt: skip
    assert set(billions) == set(plan.PUBLISHED)
    for name, size in billions.items():
        assert plan.parameters(plan.PUBLISHED[name]) / 1e9 == pytest.approx(size, abs=0.01), name


def test_fsdp_divides_the_sharded_parts_by_the_world_size():
    single = tiny_plan().parts
    sharded = tiny_plan("trainer.strategy=fsdp", "trainer.devices=4").parts
    for name in ("student_weights", "student_grads", "teacher_weights"):
        assert getattr(sharded, name) == -(-getattr(single, name) // 4), name
    assert sharded.optimizer_state == 2 * sharded.student_weights
    assert sharded.fsdp_gathered > 0  # two layers and the root of each model, gathered
    for name in ("activations", "student_logits", "teacher_logits", "loss", "rollout_kv_cache"):
        assert getattr(sharded, name) == getattr(single, name), name  # per-rank batch: not sharded
    checkpointed = tiny_plan("trainer.strategy=fsdp", "trainer.devices=4", "trainer.activation_checkpointing=true")
    assert checkpointed.parts.activations == checkpointed.parts.activations_checkpointed < single.activations
    ddp = tiny_plan("trainer.strategy=ddp", "trainer.devices=4").parts
    assert ddp.student_weights == single.student_weights and ddp.ddp_buckets == single.student_weights


def test_bf16_weights_halve_the_state_and_are_flagged(tmp_path):
    folder = tmp_path / "student"
    folder.mkdir()
    config = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 1000,
              "tie_word_embeddings": True}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    p = tiny_plan(f"student.path={folder}", "student.dtype=bfloat16", "student.tokenizer.source=fixture:gpt2")
    shape = p.setting.student
    assert (shape.vocab, shape.kv_heads, shape.qk_norm, shape.source) == (1000, 2, True, str(folder / "config.json"))
    assert p.parts.student_weights == plan.parameters(shape) * 2 and p.parts.optimizer_state == 2 * plan.parameters(shape) * 2
    assert any("rounded away" in note for note in p.notes)


def test_a_run_that_does_not_fit_gets_advice_that_fits():
    one, four = tiny_plan("data.batch_size=1").parts.total, tiny_plan().parts.total
    budget_gib = (one + (four - one) / 2) / plan.GIB  # between one prompt per rank and four
    p = tiny_plan(gpu_memory=budget_gib)
    assert not p.fits and p.largest_batch is not None and 1 <= p.largest_batch < 4
    batch = next(x for x in p.suggestions if "data.batch_size" in x.overrides and len(x.overrides) == 1)
    assert batch.overrides["data.batch_size"] == p.largest_batch
    assert batch.total <= budget_gib * plan.GIB
    overrides = [f"{k}={v}" for k, v in batch.overrides.items()]
    assert tiny_plan(*overrides, gpu_memory=budget_gib).fits
    assert not tiny_plan(f"data.batch_size={p.largest_batch + 1}", gpu_memory=budget_gib).fits
    for suggestion in p.suggestions:  # every suggestion is checked with the same estimate
        assert suggestion.total <= budget_gib * plan.GIB, suggestion.text


def test_advice_is_a_valid_config():
    p = tiny_plan(gpu_memory=tiny_plan("data.batch_size=1").parts.total / plan.GIB)
    assert p.suggestions and all(plan.valid_change(load(DEFAULT, overrides=TINY), x.overrides) for x in p.suggestions)
    refused = plan.valid_change(load(DEFAULT, overrides=TINY), {"data.batch_size": 0})
    assert refused is False  # config.validate: data.batch_size >= 1


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_cli_plans_each_paper_config_offline(name, capsys):
    path = str(ROOT / "configs" / "experiment" / f"{name}.yaml")
    assert main(["plan", path, "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "built-in table" in out and "peak = held" in out and "fits in 80 GiB" in out
    assert main(["plan", path, "--json", "data.batch_size=1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["setting"]["prompts"] == 1 and data["total_bytes"] == data["held_bytes"] + max(data["phases_bytes"].values())
    if not data["fits"]:
        assert data["suggestions"] and all(x["total"] <= 80 * plan.GIB for x in data["suggestions"])


def test_unknown_hub_model_is_a_config_error(capsys):
    assert main(["plan", str(DEFAULT), "student.path=nobody/unknown-model"]) == 2
    assert "huggingface-cli download nobody/unknown-model config.json" in capsys.readouterr().err


def test_micro_batches_scale_the_scored_parts_with_m_not_s():
    """trainer.micro_batch_size=1 of S = 4: the logits, their gradient, the loss, the teacher's
    forward and the student's activations are one sequence's (M = 1, N = 16 positions); the
    rollout's KV cache and the weights stay the whole batch's."""
    whole, p = tiny_plan().parts, tiny_plan("trainer.micro_batch_size=1")
    s, parts = p.setting, p.parts
    M, T, N = 1, 24, 16
    assert (s.sequences, s.micro_sequences, s.micro_positions) == (4, M, N)
    assert parts.rollout_kv_cache == whole.rollout_kv_cache == 2 * 2 * 64 * 4 * T * 4  # all S sequences
    assert parts.held == whole.held
    mask = M * T * T * 4
    assert parts.teacher_scoring == M * T * 4 * (2 * 64 + 3 * 256) + mask + M * 17 * 419 * 4
    assert parts.teacher_logits == N * 419 * 4
    assert parts.student_logits == N * 320 * 4
    assert parts.student_logits_grad == 2 * N * 320 * 4
    assert parts.loss == 8 * N * 320 * 4  # one chunk of N = 16 rows
    per_layer = M * T * (2 * 12 * 64 + 4 * (5 * 64 + 4 * 256))
    assert parts.activations == 2 * per_layer + M * T * 8 * 64 + N * 4 * 64 + mask
    for name in ("teacher_logits", "student_logits", "student_logits_grad", "loss"):
        assert getattr(parts, name) * 4 == getattr(whole, name), name  # M = S / 4
    # m >= S is the whole batch
    assert tiny_plan("trainer.micro_batch_size=4").parts == tiny_plan("trainer.micro_batch_size=9").parts == whole
    two = tiny_plan("trainer.micro_batch_size=2").parts
    assert two.student_logits == 2 * parts.student_logits and two.total < whole.total
    assert any("micro_batch_size=1" in note for note in p.notes)


def test_advice_offers_micro_batches_first_when_the_batch_does_not_fit():
    one, whole = tiny_plan("trainer.micro_batch_size=1").parts.total, tiny_plan().parts.total
    budget_gib = (one + (whole - one) / 2) / plan.GIB  # one sequence at a time fits, the whole batch not
    p = tiny_plan(gpu_memory=budget_gib)
    assert not p.fits
    first = p.suggestions[0]
    assert set(first.overrides) == {"trainer.micro_batch_size"} and "trainer.micro_batch_size=" in first.text
    m = first.overrides["trainer.micro_batch_size"]
    assert 1 <= m < 4 and first.total <= budget_gib * plan.GIB
    assert tiny_plan(f"trainer.micro_batch_size={m}", gpu_memory=budget_gib).fits
    if m + 1 < 4:  # the largest that fits
        assert not tiny_plan(f"trainer.micro_batch_size={m + 1}", gpu_memory=budget_gib).fits
    assert plan.valid_change(load(DEFAULT, overrides=TINY), first.overrides)
    assert "trainer.micro_batch_size" in plan.format_plan(p)


def test_restricted_teacher_columns_shrink_the_teacher_logits_for_exact_not_bpm():
    """exact declares V∩ (bound min(V_s, V_t) = 320 without the tokenizers, or --shared-vocab):
    C = min(V_t, |V∩| + N) columns + a float32 normaliser per position; bpm reads every column."""
    N, V_t = 64, 419
    full = tiny_plan("aligner.name=exact", "loss.restrict_teacher_columns=false").parts
    assert full.teacher_logits == N * V_t * 4 and full.teacher_check == 0
    exact = tiny_plan("aligner.name=exact")
    s, parts = exact.setting, exact.parts
    assert (s.teacher_columns, s.teacher_width) == (320, min(V_t, 320 + N)) == (320, 384)
    assert parts.teacher_logits == N * 384 * 4 + 4 * N < full.teacher_logits
    working, mask = 4 * 24 * 4 * (2 * 64 + 3 * 256), 4 * 24 * 24 * 4
    # hidden states at the response positions, one (64, V_t) block + its float32 copy and logsumexp temporary
    assert parts.teacher_scoring == working + mask + N * 64 * 4 + N * V_t * (4 + 8)
    assert parts.teacher_check == 17 * V_t * 4 + 16 * V_t * 8  # one response's full forward, first step
    assert any("min(V_s, V_t) = 320" in note for note in exact.notes)
    given = plan.make_plan(load(DEFAULT, overrides=[*TINY, "aligner.name=exact"]), 80.0, prompt_tokens=8, shared_vocab=100)
    assert given.parts.teacher_logits == N * (100 + N) * 4 + 4 * N
    alm = tiny_plan("aligner.name=alm").parts  # only the response tokens' ids
    assert alm.teacher_logits == N * N * 4 + 4 * N
    for flag in ("true", "false"):  # bpm: the whole vocabulary either way
        bpm = tiny_plan("aligner.name=bpm", f"loss.restrict_teacher_columns={flag}")
        assert bpm.setting.teacher_columns is None and bpm.parts.teacher_logits == N * V_t * 4
        assert bpm.parts.teacher_check == 0


def test_identical_tokenizers_score_exact_over_the_full_vocabulary():
    same = tiny_plan("aligner.name=exact", "student.tokenizer.source=fixture:gpt2", "teacher.tokenizer.source=fixture:gpt2")
    assert same.setting.teacher_columns is None and any("V∩ = V" in note for note in same.notes)
    shapes = plan.PUBLISHED["Qwen/Qwen3-0.6B"], plan.PUBLISHED["Qwen/Qwen3-4B"]
    sod = load(ROOT / "configs" / "experiment" / "sod_qwen3.yaml")
    assert plan.tokenizers_identical(sod, *shapes)  # one tokenizer family in the built-in table
    assert not plan.tokenizers_identical(sod, plan.PUBLISHED["google/gemma-2-2b-it"], shapes[1])


def test_cli_shared_vocab_shrinks_a_paper_config(capsys):
    path = str(ROOT / "configs" / "experiment" / "simct_qwen7b_gemma2b.yaml")
    assert main(["plan", path, "--json"]) == 0
    bound = json.loads(capsys.readouterr().out)
    assert main(["plan", path, "--json", "--shared-vocab", "90000"]) == 0
    given = json.loads(capsys.readouterr().out)
    n = 8 * 4096
    assert bound["parts_bytes"]["teacher_logits"] == n * 152_064 * 2 + 4 * n  # bound: min(256,000, 152,064)
    assert given["parts_bytes"]["teacher_logits"] == n * (90_000 + n) * 2 + 4 * n
    assert main(["plan", path, "--shared-vocab", "-1"]) == 2
