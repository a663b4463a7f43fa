"""`lightning-opd plan CONFIG... [key=value...] [--gpu-memory 80] [--prompt-tokens N] [--shared-vocab N] [--json]`:
the per-device memory of a training run, part by part, before anything is downloaded or built.

    lightning-opd plan configs/experiment/simct_qwen7b_gemma2b.yaml --gpu-memory 80
    lightning-opd plan configs/experiment/default.yaml data.batch_size=8 --json
    lightning-opd plan configs/experiment/simct_qwen7b_gemma2b.yaml trainer.micro_batch_size=2 --shared-vocab 90000

Model sizes come from the config: a tiny model from `student/teacher.tiny.*` and its tokenizer's
vocabulary (a trained tokenizer has `vocab_size` + 256 byte tokens + its special tokens; any
other is loaded, offline); a model given by `path` from its `config.json`, read from the local
folder, else from the Hugging Face cache, else from `PUBLISHED` below (the paper-pair models'
published configs). Nothing goes to the network.

Symbols (all per device): P parameters; L layers; h hidden size; q = heads·head_dim and
k = kv_heads·head_dim the query and key widths; I the MLP width; V the vocabulary (logit width);
S sequences per rank = `data.batch_size` × `rollout.samples_per_prompt`; T tokens per sequence =
prompt (`--prompt-tokens`, default `data.max_prompt_tokens`, the longest prompt admitted) +
R = `rollout.max_new_tokens`; M the sequences scored and back-propagated together: m =
`trainer.micro_batch_size` when 0 < m < S, else S (OPDModule, "Micro-batches": the batch is
rolled out whole, then scored, aligned and back-propagated m responses at a time, each
micro-batch's tensors freed before the next; the gradients accumulate in the parameters' own,
counted once); N = M·R response positions of one micro-batch (every response at full length);
p the parameters' bytes and c the compute bytes (activations, logits: 2 under bf16 precision or
bf16/fp16 weights, else 4); W the world size `trainer.devices` × `trainer.num_nodes` under
`fsdp`, else 1 for what is sharded. The teacher's tokens of a response are taken as many as the
student's (their ratio depends on the two tokenizers). Bytes:

- student weights, gradients: P·p/W each. AdamW state: 2·P·p/W — `torch.optim.AdamW` keeps both
  moments in the parameters' dtype (bf16 weights get bf16 moments and no fp32 master copy);
  `ddp` adds one more P·p of gradient buckets.
- `fsdp` (W > 1) gathers a unit at a time: each model's root (embeddings, untied head, final
  norm) stays gathered, plus two decoder layers (the running one and the prefetched one), in the
  gather dtype (bf16 under bf16 precision on GPU, `strategy.mixed_precision_policy`), and one
  layer's unsharded gradient of the student in the reduce dtype (fp32 there).
- teacher weights: P_t·p_t/W (frozen: no gradient, no optimizer state).
- rollout KV cache (HF generate): 2·L·k·S·T·c. With `rollout.engine=vllm` the engine's pool is
  instead a fixed share of the GPU, `VLLM_GPU_MEMORY_UTILIZATION` (default 0.3), held throughout.
- teacher scoring (no grad), per micro-batch: the KV cache its forward would keep under HF's
  default `use_cache` (`SCORING_USES_CACHE`; `response_logits` passes use_cache=False, so 0)
  2·L_t·k_t·M·T·c_t, one layer's working set M·T·(2h_t + 3I_t)·c_t, the attention mask, and
  either the padded (M, R+1, V_t) output before packing (full vocabulary), or, with restricted
  columns (below), the final hidden states at the response positions N·h_t·c_t, one
  (chunk, V_t) block of the full-vocabulary matmul and its float32 copy and logsumexp temporary
  chunk·V_t·(c_t + 8) (+ 4 at `loss.temperature` ≠ 1, + c_t for a logit soft-cap), chunk =
  min(`loss.chunk_rows`, N) (align/columns.py), and on the first step the check of the
  restriction against one response's full forward, (R+1)·V_t·c_t + R·V_t·max(c_t, 8) (its
  padded and packed logits, or the packed ones and two float32 copies).
- teacher columns (`loss.restrict_teacher_columns`, default on): an aligner that declares the
  teacher columns it reads (`Aligner.teacher_columns`: V∩ for exact, simct, simct_1to1,
  random_span; none for alm and uld's sampled form; bpm and uld's full form read every column)
  gets the teacher's logits over C = min(V_t, D + N) columns (the D declared ones and the
  response tokens' own ids, at most N) and a float32 normaliser per position: N·C·c_t + 4·N
  instead of N·V_t·c_t. D = |V∩| needs both tokenizers, which the plan does not load: it is
  `--shared-vocab` (as `lightning-opd align` prints it) or else the bound min(V_s, V_t) (V∩ is a
  one-to-one map of ids). With tokenizers the config shows to be the same (one source, or
  hub models of one tokenizer family in `PUBLISHED`) V∩ = V, and exact/simct score the full
  vocabulary. The aligner is asked with a stand-in shared vocabulary, so what it declares is its own.
- logits: the teacher's packed (N, C)·c_t as above and the student's (N, V_s)·c; the student's
  gradient 2·N·V_s·c (the gradient of the packed logits and the zero-filled logit-sized tensor
  that the backward of indexing allocates). A final logit soft-cap (Gemma-2) keeps one more
  padded (M, R+1, V_s) tensor for the backward.
- loss: full form, `LOSS_ROW_TENSORS` = 8 float32 (rows, U) tensors of one chunk of
  min(`loss.chunk_rows`, N) rows (one row per response position at most), U ≤ min(V_s, V_t) the
  shared vocabulary's bound; sampled form, not chunked, N·V_s·4 (the float32 logits that
  logsumexp keeps for backward) + N·V_s·c when c < 4 (the gathered 16-bit copy).
- student activations of forward + backward of one micro-batch (M sequences), per layer and
  token: a count of the tensors that HF's Llama-style decoder layer saves for backward with SDPA
  attention (checked with `torch.autograd.graph.saved_tensors_hooks`). The standard 34·h + 5·a·s bytes (16-bit) of
  Korthikanti et al. 2022 assumes a GeLU 4h MLP, multi-head attention and stored attention
  scores, none of which holds here, so:
      A = n_norm·(4 + 2c)·h + c·(5q + 4I)  [+ (4 + c)·(q + k): Qwen3's per-head q/k norms]
  Each RMSNorm keeps its float32 input (4h), its normalised input (c·h) and its output, which
  the next projection keeps (c·h); attention keeps the rotated queries, the keys and values
  repeated to every query head (q wide each), its output and the output projection's input
  (5q); the MLP keeps gate, up, act(gate) and their product (4I). Per sequence and layer, a
  model whose attention runs eagerly (Gemma-2) adds heads·T²·(4 + c [+ c]) (scores, float32
  softmax, its cast [, the soft-cap's tanh]). Once per micro-batch: the final norm (4 + c)·h per
  token, the head's input c·h per response position, the 4-D attention mask M·T²·c, and the
  KV cache of the scoring pass 2·L·k·M·T·c (0: use_cache=False). Without checkpointing:
  M·T·L·A + those. With (`trainer.activation_checkpointing`, applied only under `fsdp`): each
  layer keeps its input, M·T·L·h·c, one layer at a time is recomputed, M·T·A, + those.
- CUDA context and library workspaces: `CUDA_RESERVE` on a GPU (an assumption, not measured).

Phases do not overlap: the rollout (all S sequences), the teacher's scoring, and the student's
forward + loss + backward (one micro-batch of M at a time) run one after the other (the
gradients of the previous step are still allocated in all three: Lightning zeroes them after the
step's forward; with micro-batches the step sets them to None at its start, and the first
micro-batch's backward allocates them again, so they are counted as held either way), so the
peak is the parts held throughout
(weights, gradients, AdamW state, gathered FSDP units, teacher weights, CUDA reserve) plus the
largest phase. The training phase sums the logits, their gradient, the loss and the activations,
which is an upper bound: part of it is freed before the rest is allocated.

What is left out: allocator fragmentation, the backward's transient tensors, the sandbox's
processes, tool observations in the responses, and the rollout's per-step logits (S·V_s floats).
On a CPU run (`trainer.accelerator=cpu`) the same parts are process memory, which is how the
estimates were checked against measured peaks (docs/scaling.md, "Memory plan", and
scripts/plan_check.py): a whole step of tiny models with 152k and 248k vocabularies measured
0.94–1.03 of the estimate when every response position is a row (fewer rows, as across two
tokenizers, make the loss an overestimate), the activations alone 0.95–1.08.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning_opd.config import Config, ConfigError, load, validate

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SCORING_USES_CACHE = False  # response_logits calls the model with use_cache=False: no KV cache is kept
LOSS_ROW_TENSORS = 8  # float32 (rows, U) tensors alive per chunk of the full-form loss (docs/performance.md)
CUDA_RESERVE = GIB  # CUDA context, cuBLAS and NCCL workspaces on a GPU (assumed)
VLLM_ENV = "VLLM_GPU_MEMORY_UTILIZATION"  # as rollout/vllm_engine.py reads it
VLLM_DEFAULT_SHARE = 0.3
BYTE_TOKENS = 256  # a trained byte-level BPE starts from the 256 byte tokens

# --- model shapes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What one decoder-only model's memory depends on; sizes are element counts."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # rows of the embedding = width of the logits
    tied: bool  # the output head shares the embedding
    qkv_bias: bool = False  # biases on q, k, v (Qwen2)
    norms_per_layer: int = 2  # RMSNorms per decoder layer (Gemma-2: 4)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)
    eager_attention: bool = False  # attention scores are materialised (no SDPA: Gemma-2 in transformers)
    attn_softcap: bool = False  # tanh soft-cap of the attention scores (Gemma-2)
    final_softcap: bool = False  # tanh soft-cap of the logits (Gemma-2)
    source: str = ""  # where the numbers come from
    tokenizer: str = ""  # PUBLISHED: models with the same non-empty tag ship the same tokenizer

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def layer_parameters(m: ModelShape) -> int:
    """Parameters of one decoder layer: q, k, v, o projections (+ biases), the 3-matrix gated
    MLP, the norms (and Qwen3's per-head q/k norms)."""
    attention = m.hidden * (m.q_dim + 2 * m.kv_dim) + m.q_dim * m.hidden
    bias = m.q_dim + 2 * m.kv_dim if m.qkv_bias else 0
    norms = m.norms_per_layer * m.hidden + (2 * m.head_dim if m.qk_norm else 0)
    return attention + bias + 3 * m.hidden * m.intermediate + norms


def root_parameters(m: ModelShape) -> int:
    """Parameters outside the decoder layers: embeddings, the head if untied, the final norm."""
    return m.vocab * m.hidden * (1 if m.tied else 2) + m.hidden


def parameters(m: ModelShape) -> int:
    return m.layers * layer_parameters(m) + root_parameters(m)


# Published config.json values of the models the paper configs name (configs/experiment/simct_*.yaml,
# sod_qwen3.yaml), used when the config is neither a local folder nor in the HF cache. Source: each
# model's config.json on huggingface.co (hidden_size, num_hidden_layers, num_attention_heads,
# num_key_value_heads, head_dim, intermediate_size, vocab_size, tie_word_embeddings), as of 2025;
# the parameter counts they give match the published sizes (7.62 B, 3.84 B, 2.61 B, 4.02 B,
# 0.60 B, 1.72 B). Model-family details from transformers' modeling code: Qwen2 has q/k/v biases,
# Qwen3 per-head q/k norms, Gemma-2 four norms per layer, soft-capped attention scores (50) and
# logits (30), and runs eager attention (`_supports_sdpa = False`). `tokenizer`: the Qwen3 models
# ship one tokenizer (the same tokenizer.json; so the exact aligner scores the full vocabulary).
PUBLISHED: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(
        "Qwen/Qwen2.5-7B-Instruct", hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128,
        intermediate=18944, vocab=152064, tied=False, qkv_bias=True,
        source="built-in table (huggingface.co/Qwen/Qwen2.5-7B-Instruct config.json)", tokenizer="qwen2.5"),
    "microsoft/Phi-4-mini-instruct": ModelShape(
        "microsoft/Phi-4-mini-instruct", hidden=3072, layers=32, heads=24, kv_heads=8, head_dim=128,
        intermediate=8192, vocab=200064, tied=True,
        source="built-in table (huggingface.co/microsoft/Phi-4-mini-instruct config.json)", tokenizer="phi4-mini"),
    "google/gemma-2-2b-it": ModelShape(
        "google/gemma-2-2b-it", hidden=2304, layers=26, heads=8, kv_heads=4, head_dim=256,
        intermediate=9216, vocab=256000, tied=True, norms_per_layer=4, eager_attention=True,
        attn_softcap=True, final_softcap=True,
        source="built-in table (huggingface.co/google/gemma-2-2b-it config.json)", tokenizer="gemma2"),
    "Qwen/Qwen3-4B": ModelShape(
        "Qwen/Qwen3-4B", hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128,
        intermediate=9728, vocab=151936, tied=True, qk_norm=True,
        source="built-in table (huggingface.co/Qwen/Qwen3-4B config.json)", tokenizer="qwen3"),
    "Qwen/Qwen3-1.7B": ModelShape(
        "Qwen/Qwen3-1.7B", hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128,
        intermediate=6144, vocab=151936, tied=True, qk_norm=True,
        source="built-in table (huggingface.co/Qwen/Qwen3-1.7B config.json)", tokenizer="qwen3"),
    "Qwen/Qwen3-0.6B": ModelShape(
        "Qwen/Qwen3-0.6B", hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128,
        intermediate=3072, vocab=151936, tied=True, qk_norm=True,
        source="built-in table (huggingface.co/Qwen/Qwen3-0.6B config.json)", tokenizer="qwen3"),
}  # fmt: skip

# model types whose transformers implementation differs from the Llama layout in what we count
QKV_BIAS_TYPES = ("qwen2",)
QK_NORM_TYPES = ("qwen3", "gemma3", "gemma3_text", "olmo2")
FOUR_NORM_TYPES = ("gemma2", "gemma3", "gemma3_text")


def shape_from_hf_config(name: str, raw: dict[str, Any], source: str) -> ModelShape:
    """A `ModelShape` from a config.json dict (a multimodal config's `text_config` is used)."""
    text = raw.get("text_config") or raw
    model_type = str(text.get("model_type") or raw.get("model_type") or "")
    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    head_dim = text.get("head_dim") or hidden // heads
    return ModelShape(
        name, hidden=hidden, layers=int(text["num_hidden_layers"]), heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        intermediate=int(text["intermediate_size"]), vocab=int(text["vocab_size"]),
        tied=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        qkv_bias=model_type in QKV_BIAS_TYPES or bool(text.get("attention_bias", False)),
        norms_per_layer=4 if model_type in FOUR_NORM_TYPES else 2, qk_norm=model_type in QK_NORM_TYPES,
        eager_attention=not _supports_sdpa(model_type),
        attn_softcap=text.get("attn_logit_softcapping") is not None,
        final_softcap=text.get("final_logit_softcapping") is not None, source=source,
    )  # fmt: skip


def _supports_sdpa(model_type: str) -> bool:
    """Whether transformers runs this model type with SDPA by default (else eager attention,
    which materialises the scores). Unknown types count as SDPA."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
    except Exception:  # an old or partial transformers: assume the common case
        return True
    return bool(getattr(cls, "_supports_sdpa", True))


def find_config_json(path: str) -> Path | None:
    """`path`/config.json when `path` is a local folder, else the HF cache's copy (offline)."""
    local = Path(path) / "config.json"
    if local.is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # not a valid repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


def model_shape(cfg: Config, role: str) -> ModelShape:
    """The student's or teacher's shape: its `tiny` settings and vocabulary, or its `path`'s
    config.json (local folder, HF cache, then `PUBLISHED`)."""
    model = getattr(cfg, role)
    if model.path:
        from lightning_opd.gguf_models import local_model_path

        # a GGUF spec: its converted folder (converted once into run.cache_dir, as train would)
        found = find_config_json(local_model_path(model.path, cfg.run.cache_dir, setting=f"{role}.path") or "")
        if found is not None:
            raw = json.loads(found.read_text(encoding="utf-8"))
            return shape_from_hf_config(model.path, raw, str(found))
        if model.path in PUBLISHED:
            return PUBLISHED[model.path]
        raise ConfigError(
            f"{role}.path={model.path!r}: no config.json in that folder or in the Hugging Face cache, and not "
            f"one of the built-in models ({', '.join(PUBLISHED)}); fetch it with "
            f"`huggingface-cli download {model.path} config.json` or point {role}.path at a local folder"
        )
    tiny = model.tiny
    return ModelShape(
        f"tiny {tiny.arch} {tiny.num_layers}x{tiny.hidden_size}", hidden=tiny.hidden_size, layers=tiny.num_layers,
        heads=tiny.num_heads, kv_heads=tiny.num_heads, head_dim=tiny.hidden_size // tiny.num_heads,
        intermediate=tiny.intermediate_size, vocab=tokenizer_vocab(cfg, role), tied=True,
        qkv_bias=tiny.arch == "qwen2", source=f"{role}.tiny + {role}.tokenizer",
    )  # fmt: skip


def tokenizer_vocab(cfg: Config, role: str) -> int:
    """The vocabulary a tiny model is sized to (`models.tiny_model` uses len(tokenizer)). A trained
    tokenizer: `vocab_size` merges + 256 byte tokens + its special tokens (at most: BPE training
    stops early on a corpus with fewer pairs); any other tokenizer is loaded, offline."""
    from lightning_opd import models

    tok_cfg = getattr(cfg, role).tokenizer
    if tok_cfg.source == "train":
        specials = models.TEACHER_SPECIALS if role == "teacher" else models.STUDENT_SPECIALS
        return tok_cfg.vocab_size + BYTE_TOKENS + 2 + len(specials["extra"])
    try:
        return len(models.load_tokenizer(tok_cfg))
    except Exception as err:
        raise ConfigError(f"{role}.tokenizer.source={tok_cfg.source!r}: cannot load it to size the model ({err})") from None


# --- the setting: every number the estimate reads ---------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One training run's memory-relevant numbers, per rank (bytes per element, counts)."""

    student: ModelShape
    teacher: ModelShape
    prompts: int  # data.batch_size: prompts per rank
    samples: int  # rollout.samples_per_prompt
    prompt_tokens: int  # tokens of a rendered prompt
    new_tokens: int  # rollout.max_new_tokens
    param_dtype: str  # the student's parameters (its gradients and AdamW moments too): float32 | bfloat16 | float16
    compute_dtype: str  # the student's activations and logits
    teacher_param_dtype: str
    teacher_compute_dtype: str
    strategy: str  # auto | ddp | fsdp
    world: int  # devices × nodes
    checkpointing: bool  # trainer.activation_checkpointing (applied only under fsdp)
    loss_form: str  # full | sampled
    chunk_rows: int
    gpu: bool
    fsdp_mixed: bool  # fsdp on GPU under bf16: gathered in bf16, gradients reduced in fp32
    vllm_pool: int = 0  # bytes vLLM holds (rollout.engine=vllm), else 0
    micro_batch: int = 0  # trainer.micro_batch_size: sequences scored and back-propagated together (0 = all)
    teacher_columns: int | None = None  # D, the teacher columns the aligner declares (restricted), None = all
    shared_vocab_given: bool = False  # D counts a |V∩| given with --shared-vocab, not the bound min(V_s, V_t)
    temperature: float = 1.0  # loss.temperature (the restricted normaliser's scaling)

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.param_dtype]

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def teacher_param_bytes(self) -> int:
        return DTYPE_BYTES[self.teacher_param_dtype]

    @property
    def teacher_compute_bytes(self) -> int:
        return DTYPE_BYTES[self.teacher_compute_dtype]

    @property
    def sequences(self) -> int:
        return self.prompts * self.samples

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def response_positions(self) -> int:
        """Of the whole per-rank batch (S·R)."""
        return self.sequences * self.new_tokens

    @property
    def micro_sequences(self) -> int:
        """M: the sequences scored, aligned and back-propagated together."""
        return min(self.micro_batch, self.sequences) if self.micro_batch > 0 else self.sequences

    @property
    def micro_positions(self) -> int:
        """N = M·R: the response positions whose logits one micro-batch holds."""
        return self.micro_sequences * self.new_tokens

    @property
    def restricted(self) -> bool:
        return self.teacher_columns is not None

    @property
    def teacher_width(self) -> int:
        """C: the teacher logits' columns, min(V_t, D + N) restricted (the declared columns and the
        response tokens' ids), else V_t."""
        if self.teacher_columns is None:
            return self.teacher.vocab
        return min(self.teacher.vocab, self.teacher_columns + self.micro_positions)

    @property
    def shards(self) -> int:
        return self.world if self.strategy == "fsdp" else 1

    @property
    def checkpointed(self) -> bool:
        return self.checkpointing and self.strategy == "fsdp"


def precision_dtypes(precision: str, weights: str) -> tuple[str, str]:
    """(parameter dtype, compute dtype) of a model whose weights load as `weights` (float32 for
    tiny models) under Lightning's `trainer.precision`: `bf16-true` converts the weights,
    `bf16-mixed` autocasts the compute, `32-true` computes in the weights' dtype."""
    half = "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else None
    param = half if half and precision.endswith("-true") else weights
    return param, half or param


def world_size(cfg: Config) -> int:
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1  # "auto" counts as 1
    return max(1, devices) * max(1, cfg.trainer.num_nodes)


def tokenizers_identical(cfg: Config, student: ModelShape, teacher: ModelShape) -> bool:
    """Whether the config shows the two tokenizers to be the same without loading them: one
    source (not `train`, whose student and teacher get different special tokens) with the same
    EOS, or two hub models of one tokenizer family in `PUBLISHED`. False when it cannot tell."""
    s_tok, t_tok = cfg.student.tokenizer, cfg.teacher.tokenizer
    if s_tok.eos != t_tok.eos or "train" in (s_tok.source, t_tok.source):
        return False
    s_source = cfg.student.path if s_tok.source == "model" else s_tok.source
    t_source = cfg.teacher.path if t_tok.source == "model" else t_tok.source
    if s_source and s_source == t_source:
        return True
    return s_tok.source == t_tok.source == "model" and bool(student.tokenizer) and student.tokenizer == teacher.tokenizer


def declared_teacher_columns(cfg: Config, student: ModelShape, teacher: ModelShape,
                             shared_vocab: int | None) -> int | None:  # fmt: skip
    """D, the teacher columns the aligner declares (`Aligner.teacher_columns`) with
    `loss.restrict_teacher_columns`, or None when the teacher is scored over its whole
    vocabulary. The aligner is asked with a stand-in shared vocabulary of |V∩| = `shared_vocab`
    ids, else min(V_s, V_t) (an upper bound), and identical tokenizers where the config shows them."""
    if not cfg.loss.restrict_teacher_columns:
        return None
    from types import SimpleNamespace

    import torch

    from lightning_opd.align import build_aligner

    size = min(student.vocab, teacher.vocab) if shared_vocab is None else min(shared_vocab, teacher.vocab)
    stand_in = SimpleNamespace(identity=tokenizers_identical(cfg, student, teacher),
                               teacher_ids=torch.arange(size))  # fmt: skip
    try:
        columns = build_aligner(cfg.aligner, cfg.trainer.seed).teacher_columns(stand_in, cfg.loss)  # type: ignore[arg-type]
    except Exception:  # an aligner that reads more of the vocabulary: plan for every column
        return None
    return None if columns is None else min(int(columns.numel()), teacher.vocab)


def setting_from_config(cfg: Config, gpu_memory_gib: float, prompt_tokens: int | None = None,
                        shared_vocab: int | None = None) -> Setting:  # fmt: skip
    """Read the config (and the models' shapes) into a `Setting`; `shared_vocab` is |V∩| when
    known (`--shared-vocab`)."""
    student, teacher = model_shape(cfg, "student"), model_shape(cfg, "teacher")
    precision = cfg.trainer.precision
    s_param, s_compute = precision_dtypes(precision, cfg.student.dtype if cfg.student.path else "float32")
    t_param, t_compute = precision_dtypes(precision, cfg.teacher.dtype if cfg.teacher.path else "float32")
    gpu = cfg.trainer.accelerator != "cpu"
    share = float(os.environ.get(VLLM_ENV, VLLM_DEFAULT_SHARE)) if cfg.rollout.engine == "vllm" else 0.0
    return Setting(
        student=student, teacher=teacher, prompts=cfg.data.batch_size, samples=cfg.rollout.samples_per_prompt,
        prompt_tokens=cfg.data.max_prompt_tokens if prompt_tokens is None else prompt_tokens,
        new_tokens=cfg.rollout.max_new_tokens, param_dtype=s_param, compute_dtype=s_compute,
        teacher_param_dtype=t_param, teacher_compute_dtype=t_compute, strategy=cfg.trainer.strategy,
        world=world_size(cfg), checkpointing=bool(cfg.trainer.activation_checkpointing), loss_form=cfg.loss.form,
        chunk_rows=cfg.loss.chunk_rows, gpu=gpu, fsdp_mixed=gpu and precision.startswith("bf16"),
        vllm_pool=int(share * gpu_memory_gib * GIB), micro_batch=cfg.trainer.micro_batch_size,
        teacher_columns=declared_teacher_columns(cfg, student, teacher, shared_vocab),
        shared_vocab_given=shared_vocab is not None, temperature=float(cfg.loss.temperature),
    )  # fmt: skip


# --- the estimate --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """Bytes per device, part by part (see the module docstring for each formula)."""

    student_weights: int
    student_grads: int
    optimizer_state: int  # AdamW's two moments
    ddp_buckets: int
    fsdp_gathered: int
    teacher_weights: int
    cuda_reserve: int
    vllm_pool: int
    rollout_kv_cache: int
    teacher_scoring: int  # the teacher forward's KV cache, mask, one layer's working set, padded output or column blocks
    teacher_logits: int  # packed (N, C) + the restricted scoring's normaliser
    student_logits: int
    student_logits_grad: int
    loss: int
    activations: int  # what the run uses: activations_checkpointed under fsdp + checkpointing, else the other
    activations_no_checkpointing: int
    activations_checkpointed: int
    teacher_check: int = 0  # first step, restricted columns: one response's full-vocabulary forward

    @property
    def held(self) -> int:
        """Held through the whole step."""
        return (self.student_weights + self.student_grads + self.optimizer_state + self.ddp_buckets
                + self.fsdp_gathered + self.teacher_weights + self.cuda_reserve + self.vllm_pool)  # fmt: skip

    @property
    def phases(self) -> dict[str, int]:
        """What each phase of the step adds on top of `held`; they run one after the other."""
        return {
            "rollout": self.rollout_kv_cache,
            "teacher scoring": self.teacher_scoring + self.teacher_check + self.teacher_logits,
            "training": self.teacher_logits + self.student_logits + self.student_logits_grad + self.loss
            + self.activations,
        }

    @property
    def peak_phase(self) -> str:
        phases = self.phases
        return max(phases, key=lambda k: phases[k])

    @property
    def total(self) -> int:
        return self.held + max(self.phases.values())


def layer_activation_bytes(m: ModelShape, c: int) -> int:
    """Bytes one decoder layer keeps for backward per token (formula A of the module docstring)."""
    saved = m.norms_per_layer * (4 + 2 * c) * m.hidden + c * (5 * m.q_dim + 4 * m.intermediate)
    if m.qk_norm:
        saved += (4 + c) * (m.q_dim + m.kv_dim)
    return saved


def layer_working_bytes(m: ModelShape, c: int) -> int:
    """Bytes per token of one layer's tensors in flight in a no-grad forward (the teacher's): the
    hidden state and its normalised copy, the MLP's gate, up and their product."""
    return c * (2 * m.hidden + 3 * m.intermediate)


def attention_score_bytes(m: ModelShape, tokens: int, c: int) -> int:
    """Bytes one layer of an eager-attention model keeps per sequence: heads·T² scores."""
    if not m.eager_attention:
        return 0
    return m.heads * tokens * tokens * (4 + c + (c if m.attn_softcap else 0))


def mask_bytes(s: Setting, c: int) -> int:
    """The 4-D attention mask (M, 1, T, T) a padded micro-batch's forward builds once (in the compute
    dtype, as measured on CPU; a boolean mask would take 1 byte an entry)."""
    return s.micro_sequences * s.tokens * s.tokens * c


def scoring_cache_bytes(m: ModelShape, s: Setting, c: int) -> int:
    """The KV cache a scoring forward would keep under HF's default use_cache: 2·L·k·M·T·c."""
    return 2 * m.layers * m.kv_dim * s.micro_sequences * s.tokens * c if SCORING_USES_CACHE else 0


def activation_bytes(s: Setting, checkpointed: bool) -> int:
    """The student's forward + backward activations for one micro-batch (M sequences), with or
    without per-layer activation checkpointing, including its scoring pass's KV cache."""
    m, c, seqs, tokens = s.student, s.compute_bytes, s.micro_sequences, s.tokens
    per_layer = seqs * (tokens * layer_activation_bytes(m, c) + attention_score_bytes(m, tokens, c))
    # the final norm's float32 input and output, the head's input at the response positions, and the
    # 4-D padding mask (M, 1, T, T) that every layer's attention keeps
    outside = seqs * tokens * (4 + c) * m.hidden + s.micro_positions * c * m.hidden + mask_bytes(s, c)
    cache = scoring_cache_bytes(m, s, c)
    if checkpointed:
        return seqs * tokens * m.layers * m.hidden * c + per_layer + outside + cache
    return m.layers * per_layer + outside + cache


def loss_bytes(s: Setting) -> int:
    """The loss's own tensors: one chunk of float32 (rows, U) tensors (full form), or the
    unchunked full-vocabulary log-probabilities of the sampled form."""
    n, c = s.micro_positions, s.compute_bytes
    if s.loss_form == "sampled":  # the float32 logits kept for logsumexp's backward (+ the 16-bit gather)
        return n * s.student.vocab * (4 + (c if c < 4 else 0))
    return LOSS_ROW_TENSORS * min(s.chunk_rows, n) * min(s.student.vocab, s.teacher.vocab) * 4


def logits_grad_bytes(s: Setting) -> int:
    """The gradient of the student's packed logits and the zero-filled tensor that the backward of
    indexing (a loss chunk's rows, then the packing) allocates: 2 logit-sized tensors."""
    return 2 * s.micro_positions * s.student.vocab * s.compute_bytes


def teacher_output_bytes(s: Setting) -> int:
    """What the teacher's forward adds past its layers: the padded (M, R+1, V_t) output before
    packing (full vocabulary), or the final hidden states at the N response positions and one
    (chunk, V_t) block of the column head with its float32 copy and logsumexp temporary (+ the
    division at τ ≠ 1, + the soft-cap's tanh)."""
    te, tc, n = s.teacher, s.teacher_compute_bytes, s.micro_positions
    if not s.restricted:
        return s.micro_sequences * (s.new_tokens + 1) * te.vocab * tc
    per_entry = tc + 8 + (4 if s.temperature != 1.0 else 0) + (tc if te.final_softcap else 0)
    return n * te.hidden * tc + min(s.chunk_rows, n) * te.vocab * per_entry


def teacher_check_bytes(s: Setting) -> int:
    """The first restricted scoring's check against one response's own forward (align/columns.py):
    its padded and packed full-vocabulary logits, or the packed ones and two float32 copies."""
    if not s.restricted:
        return 0
    te, tc, r = s.teacher, s.teacher_compute_bytes, s.new_tokens
    return (r + 1) * te.vocab * tc + r * te.vocab * max(tc, 8)


def estimate(s: Setting) -> Parts:
    """Every part, in bytes per device, for setting `s`."""
    st, te = s.student, s.teacher
    p_s, p_t = parameters(st), parameters(te)
    shard = s.shards
    state = math.ceil(p_s * s.param_bytes / shard)
    gathered = 0
    if s.strategy == "fsdp" and s.world > 1:
        gather_s, gather_t = (2, 2) if s.fsdp_mixed else (s.param_bytes, s.teacher_param_bytes)
        reduce = 4 if s.fsdp_mixed else s.param_bytes
        gathered = ((root_parameters(st) + 2 * layer_parameters(st)) * gather_s + layer_parameters(st) * reduce
                    + (root_parameters(te) + 2 * layer_parameters(te)) * gather_t)  # fmt: skip
    seqs, n, c, tc = s.sequences, s.micro_positions, s.compute_bytes, s.teacher_compute_bytes
    micro = s.micro_sequences
    padded = micro * (s.new_tokens + 1)  # positions of the (M, R+1, V) model output
    no_ckpt, ckpt = activation_bytes(s, False), activation_bytes(s, True)
    return Parts(
        student_weights=state,
        student_grads=state,
        optimizer_state=2 * state,
        ddp_buckets=p_s * s.param_bytes if s.strategy == "ddp" and s.world > 1 else 0,
        fsdp_gathered=gathered,
        teacher_weights=math.ceil(p_t * s.teacher_param_bytes / shard),
        cuda_reserve=CUDA_RESERVE if s.gpu else 0,
        vllm_pool=s.vllm_pool,
        rollout_kv_cache=0 if s.vllm_pool else 2 * st.layers * st.kv_dim * seqs * s.tokens * c,
        teacher_scoring=(scoring_cache_bytes(te, s, tc) + micro * s.tokens * layer_working_bytes(te, tc)
                         + micro * attention_score_bytes(te, s.tokens, tc) + mask_bytes(s, tc)
                         + teacher_output_bytes(s)),  # fmt: skip
        teacher_logits=n * s.teacher_width * tc + (4 * n if s.restricted else 0),
        student_logits=n * st.vocab * c + (padded * st.vocab * c if st.final_softcap else 0),
        student_logits_grad=logits_grad_bytes(s),
        loss=loss_bytes(s),
        activations=ckpt if s.checkpointed else no_ckpt,
        activations_no_checkpointing=no_ckpt,
        activations_checkpointed=ckpt,
        teacher_check=teacher_check_bytes(s),
    )


# --- fitting: what to change when it does not fit ----------------------------------------------


@dataclass(frozen=True)
class Suggestion:
    """One change that makes the run fit: its overrides and the peak it gives (bytes)."""

    text: str
    overrides: dict[str, Any]
    total: int


def largest_fitting(low: int, high: int, fits) -> int | None:
    """The largest v in [low, high] with fits(v), assuming fits is monotone (true up to some v)."""
    if high < low or not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def largest_batch(s: Setting, budget: int) -> int | None:
    """The most prompts per rank (`data.batch_size`) that fit in `budget` bytes, or None."""
    return largest_fitting(1, 1 << 20, lambda b: estimate(replace(s, prompts=b)).total <= budget)


def largest_micro_batch(s: Setting, budget: int) -> int | None:
    """The most sequences per micro-batch (`trainer.micro_batch_size`) below the current M that
    fit in `budget` bytes, all else as configured, or None."""
    return largest_fitting(1, s.micro_sequences - 1, lambda m: estimate(replace(s, micro_batch=m)).total <= budget)


def suggestions(s: Setting, budget: int) -> list[Suggestion]:
    """Single changes that make `s` fit in `budget` bytes, each checked with `estimate`: smaller
    micro-batches (the same batch, so the same gradient), fewer prompts per rank, activation
    checkpointing, FSDP over more devices with the same global batch, shorter responses. If none
    does, or only shorter responses do, one combined change (one prompt per rank and micro-batches
    of one sequence, then checkpointing where needed, the responses as configured if they fit,
    else the longest that do) when it keeps longer responses, or nothing."""
    out: list[Suggestion] = []

    def fits(changed: Setting) -> bool:
        return estimate(changed).total <= budget

    def add(text: str, overrides: dict[str, Any], changed: Setting) -> None:
        out.append(Suggestion(text, overrides, estimate(changed).total))

    micro = largest_micro_batch(s, budget)
    if micro is not None:
        add(f"micro-batches of {micro} sequences, same batch and gradient: trainer.micro_batch_size={micro}",
            {"trainer.micro_batch_size": micro}, replace(s, micro_batch=micro))  # fmt: skip
    batch = largest_fitting(1, s.prompts - 1, lambda b: fits(replace(s, prompts=b)))
    if batch is not None:
        add(f"fewer prompts per rank: data.batch_size={batch} (global batch {batch * s.world} prompts)",
            {"data.batch_size": batch}, replace(s, prompts=batch))  # fmt: skip
    elif s.samples > 1 and s.prompts > 1:
        samples = largest_fitting(1, s.samples - 1, lambda k: fits(replace(s, prompts=1, samples=k)))
        if samples is not None:
            add(f"one prompt per rank, fewer samples: data.batch_size=1 rollout.samples_per_prompt={samples}",
                {"data.batch_size": 1, "rollout.samples_per_prompt": samples}, replace(s, prompts=1, samples=samples))  # fmt: skip
    checkpointed = replace(s, strategy="fsdp", checkpointing=True)
    if not s.checkpointed and fits(checkpointed):
        add("activation checkpointing (fsdp only): trainer.strategy=fsdp trainer.activation_checkpointing=true",
            {"trainer.strategy": "fsdp", "trainer.activation_checkpointing": True}, checkpointed)  # fmt: skip
    global_batch = s.prompts * s.world
    for world in (2**k for k in range(1, 11)):
        wider = replace(s, strategy="fsdp", world=world, prompts=max(1, math.ceil(global_batch / world)))
        if world > s.world and fits(wider):
            devices, nodes = (world, 1) if world <= 8 else (8, world // 8)
            add(f"FSDP over {world} devices, same global batch: trainer.strategy=fsdp trainer.devices={devices} "
                f"trainer.num_nodes={nodes} data.batch_size={wider.prompts}",
                {"trainer.strategy": "fsdp", "trainer.devices": devices, "trainer.num_nodes": nodes,
                 "data.batch_size": wider.prompts}, wider)  # fmt: skip
            break
    new = largest_fitting(1, s.new_tokens - 1, lambda r: fits(replace(s, new_tokens=r)))
    if new is not None:
        add(f"shorter responses: rollout.max_new_tokens={new}", {"rollout.max_new_tokens": new}, replace(s, new_tokens=new))
    if any("rollout.max_new_tokens" not in x.overrides for x in out):
        return out  # a single change that keeps the responses as long as configured
    base, overrides = replace(s, prompts=1), {"data.batch_size": 1}
    if s.samples > 1:  # one sequence at a time past the rollout
        base, overrides = replace(base, micro_batch=1), {**overrides, "trainer.micro_batch_size": 1}
    candidates = [(base, overrides)]  # the fewest changes first: checkpointing only if needed
    if not s.checkpointed:
        candidates.append((replace(base, strategy="fsdp", checkpointing=True),
                           {**overrides, "trainer.strategy": "fsdp", "trainer.activation_checkpointing": True}))  # fmt: skip
    trials = [(replace(c, samples=k), {**o, **({"rollout.samples_per_prompt": k} if k != s.samples else {})})
              for k in dict.fromkeys((s.samples, 1)) for c, o in candidates]  # keep the samples (GRPO groups) if possible  # fmt: skip
    # the responses as configured if any trial fits them, else the longest that the leanest trial fits
    chosen = next(((t, o, s.new_tokens) for t, o in trials if fits(t)), None)
    leanest = [trials[len(candidates) - 1], trials[-1]]  # with the configured samples per prompt, then one
    for trial, changes in [] if chosen else leanest:
        new = largest_fitting(1, s.new_tokens - 1, lambda r, t=trial: fits(replace(t, new_tokens=r)))
        if new is not None:
            chosen = (trial, {**changes, "rollout.max_new_tokens": new}, new)
            break
    # with single changes that all shorten the responses: only if it keeps longer ones
    if chosen is not None and (not out or chosen[2] > max(x.overrides["rollout.max_new_tokens"] for x in out)):
        trial, changes, new = chosen
        if "trainer.micro_batch_size" in changes:  # the largest micro-batch that this change leaves room for
            micro = largest_fitting(1, trial.sequences, lambda m, t=trial: fits(replace(t, micro_batch=m, new_tokens=new)))
            trial, changes = replace(trial, micro_batch=micro or 1), {**changes, "trainer.micro_batch_size": micro or 1}
        add("together: " + " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items()),
            changes, replace(trial, new_tokens=new))  # fmt: skip
    return out


# --- the plan: estimate, fit, notes ------------------------------------------------------------


@dataclass
class Plan:
    """The memory plan of one config on devices of `gpu_memory_gib` GiB."""

    experiment: str
    setting: Setting
    parts: Parts
    gpu_memory_gib: float
    fits: bool
    largest_batch: int | None  # prompts per rank that fit, all else as configured
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        parts = asdict(self.parts)
        return {
            "experiment": self.experiment, "gpu_memory_gib": self.gpu_memory_gib, "fits": self.fits,
            "total_bytes": self.parts.total, "held_bytes": self.parts.held, "phases_bytes": self.parts.phases,
            "peak_phase": self.parts.peak_phase, "parts_bytes": parts, "largest_batch": self.largest_batch,
            "parameters": {"student": parameters(self.setting.student), "teacher": parameters(self.setting.teacher)},
            "setting": asdict(self.setting), "suggestions": [asdict(x) for x in self.suggestions], "notes": self.notes,
        }  # fmt: skip


def notes_for(cfg: Config, s: Setting) -> list[str]:
    """What a reader of the numbers should know about this config."""
    notes = []
    if s.param_bytes == 2:
        notes.append(
            f"the student's weights are 16-bit and AdamW updates them in place (moments in the same dtype, no fp32 "
            f"master copy): a step smaller than about 2^-8 of a weight is rounded away; at optim.lr={cfg.optim.lr:g} "
            "most weights may never change. student.dtype=float32 with trainer.precision=bf16-mixed keeps fp32 "
            f"weights at 16 B per parameter instead of 8 (+{parameters(s.student) * 8 / s.shards / GIB:.1f} GiB here)"
        )
    if s.checkpointing and s.strategy != "fsdp":
        notes.append("trainer.activation_checkpointing applies only under trainer.strategy=fsdp; it is off here")
    if cfg.trainer.accelerator == "auto":
        notes.append("trainer.accelerator=auto is planned as a GPU run (the CUDA reserve is counted)")
    if not isinstance(cfg.trainer.devices, int):
        notes.append(f"trainer.devices={cfg.trainer.devices!r} is counted as 1 device per node")
    if cfg.tools.enabled:
        notes.append("tool observations inside responses are not counted (responses are taken at max_new_tokens)")
    if s.vllm_pool:
        notes.append(f"rollout.engine=vllm holds {VLLM_ENV} of the GPU for its weights and KV cache throughout")
    if s.micro_sequences < s.sequences:
        notes.append(f"trainer.micro_batch_size={s.micro_batch}: the rollout holds all {s.sequences} sequences; "
                     f"scoring, loss and backward hold {s.micro_sequences} at a time")  # fmt: skip
    if s.restricted:
        if s.teacher_columns == 0:
            what = f"{cfg.aligner.name} reads no column besides the response tokens'"
        elif s.shared_vocab_given:
            what = f"|V∩| = {s.teacher_columns:,} (--shared-vocab)"
        else:
            what = (f"|V∩| is taken as its bound min(V_s, V_t) = {s.teacher_columns:,} (the tokenizers are not "
                    "loaded; `lightning-opd align` prints |V∩|, give it with --shared-vocab)")
        notes.append(f"the teacher is scored over C = {s.teacher_width:,} of its {s.teacher.vocab:,} vocabulary columns "
                     f"(loss.restrict_teacher_columns): {what}, + the response tokens' ids")  # fmt: skip
    elif cfg.loss.restrict_teacher_columns:
        why = ("the tokenizers are the same (V∩ = V)" if tokenizers_identical(cfg, s.student, s.teacher)
               and cfg.aligner.name in ("exact", "simct", "simct_1to1", "random_span")
               else f"aligner {cfg.aligner.name} reads every column")  # fmt: skip
        notes.append(f"the teacher is scored over its full vocabulary: {why}")
    return notes


def valid_change(cfg: Config, overrides: dict[str, Any]) -> bool:
    """Whether `cfg` with `overrides` passes `config.validate` (a suggestion must be a runnable config)."""
    from omegaconf import OmegaConf

    changed = OmegaConf.merge(cfg, OmegaConf.create({}))
    for key, value in overrides.items():
        OmegaConf.update(changed, key, value, merge=True)
    try:
        validate(changed)  # type: ignore[arg-type]
    except ConfigError:
        return False
    return True


def make_plan(cfg: Config, gpu_memory_gib: float = 80.0, prompt_tokens: int | None = None,
              shared_vocab: int | None = None) -> Plan:  # fmt: skip
    """Estimate `cfg` per device, check it against `gpu_memory_gib` GiB, and say what to change
    (only changes that give a valid config). `shared_vocab`: |V∩|, when known."""
    s = setting_from_config(cfg, gpu_memory_gib, prompt_tokens, shared_vocab)
    parts = estimate(s)
    budget = int(gpu_memory_gib * GIB)
    fits = parts.total <= budget
    advice = [] if fits else [x for x in suggestions(s, budget) if valid_change(cfg, x.overrides)]
    return Plan(cfg.experiment, s, parts, gpu_memory_gib, fits, largest_batch(s, budget), advice, notes_for(cfg, s))


# --- printing and the command ------------------------------------------------------------------


def in_unit(n: float, unit: int) -> str:
    return f"{n / unit:,.2f}"


def _dtype(name: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[name]


def _shape_line(role: str, m: ModelShape, param_dtype: str, compute_dtype: str) -> str:
    attention = "eager attention" if m.eager_attention else "SDPA"
    return (f"{role}: {m.name} — {parameters(m) / 1e9:.3g} B parameters, {m.layers} layers × hidden {m.hidden}, "
            f"{m.heads}/{m.kv_heads} heads × {m.head_dim}, MLP {m.intermediate}, vocabulary {m.vocab:,}"
            f"{' (tied)' if m.tied else ''}, {attention}; weights {_dtype(param_dtype)}, compute {_dtype(compute_dtype)} "
            f"[{m.source}]")  # fmt: skip


def format_plan(plan: Plan) -> str:
    """The plan as a text table, in GiB (2^30 bytes) per device, or MiB when it is under 1 GiB."""
    s, p = plan.setting, plan.parts
    unit, name = (GIB, "GiB") if p.total >= GIB else (2**20, "MiB")

    def gib(n: float) -> str:
        return in_unit(n, unit)

    shard = f"/{s.shards}" if s.shards > 1 else ""
    lines = [
        f"Memory plan: {plan.experiment} — per device, {s.world} device(s), strategy {s.strategy}"
        + (f" (student state and teacher sharded {s.shards} ways)" if s.shards > 1 else ""),
        _shape_line("student", s.student, s.param_dtype, s.compute_dtype),
        _shape_line("teacher", s.teacher, s.teacher_param_dtype, s.teacher_compute_dtype),
        f"per rank: {s.prompts} prompts × {s.samples} samples = {s.sequences} sequences × ({s.prompt_tokens} prompt + "
        f"{s.new_tokens} new) tokens; {s.response_positions:,} response positions"
        + (f"; micro-batches of {s.micro_sequences} sequences ({s.micro_positions:,} positions)"
           if s.micro_sequences < s.sequences else ""),
        "",
        f"{'part':<58}{name:>10}  phase",
    ]  # fmt: skip
    ckpt_state = "in use" if s.checkpointed else "not in use"
    rows = [
        (f"student weights ({_dtype(s.param_dtype)}{shard})", p.student_weights, "held"),
        (f"student gradients ({_dtype(s.param_dtype)}{shard})", p.student_grads, "held"),
        (f"AdamW moments (2 × {_dtype(s.param_dtype)}{shard})", p.optimizer_state, "held"),
        ("DDP gradient buckets", p.ddp_buckets, "held"),
        ("FSDP gathered units (roots + 2 layers + 1 layer's gradient)", p.fsdp_gathered, "held"),
        (f"teacher weights ({_dtype(s.teacher_param_dtype)}{shard}, frozen)", p.teacher_weights, "held"),
        ("CUDA context and workspaces (assumed)", p.cuda_reserve, "held"),
        ("vLLM pool", p.vllm_pool, "held"),
        ("rollout KV cache", p.rollout_kv_cache, "rollout"),
        ("teacher forward: mask, one layer, " + ("column-head block" if s.restricted else "padded output"),
         p.teacher_scoring, "teacher scoring"),
        ("teacher columns' first-step check (1 response, full)", p.teacher_check, "teacher scoring"),
        (f"teacher logits (packed, {s.teacher_width:,} columns" + (" + normaliser)" if s.restricted else ")"),
         p.teacher_logits, "scoring, training"),
        ("student logits (packed)", p.student_logits, "training"),
        ("student logits gradient (packed + padded)", p.student_logits_grad, "training"),
        (f"loss ({'sampled form' if s.loss_form == 'sampled' else f'one chunk of {min(s.chunk_rows, s.micro_positions)} rows'})",
         p.loss, "training"),
        (f"student activations, no checkpointing ({'not ' if s.checkpointed else ''}in use)",
         p.activations_no_checkpointing, "training" if not s.checkpointed else "-"),
        (f"student activations, checkpointing per layer ({ckpt_state})", p.activations_checkpointed,
         "training" if s.checkpointed else "-"),
    ]  # fmt: skip
    lines += [f"{name:<58}{gib(value):>10}  {phase}" for name, value, phase in rows
              if value or (phase != "held" and not name.startswith("teacher columns'"))]
    phases = p.phases
    lines += [
        "",
        f"held throughout {gib(p.held)} {name}; phases: " + ", ".join(f"{k} {gib(v)}" for k, v in phases.items()),
        f"peak = held + {p.peak_phase} = {gib(p.total)} {name} per device",
        f"fits in {plan.gpu_memory_gib:g} GiB: {'yes' if plan.fits else 'no'}"
        + (f" ({in_unit(plan.gpu_memory_gib * GIB - p.total, GIB)} GiB to spare)" if plan.fits else ""),
        "largest data.batch_size that fits: " + (str(plan.largest_batch) if plan.largest_batch else "none (not even 1)"),
    ]  # fmt: skip
    if not plan.fits:
        lines.append("what to change (each alone, checked with the same estimate):" if plan.suggestions
                     else "no change tried here fits; use devices with more memory")  # fmt: skip
        lines += [f"  - {x.text} -> {gib(x.total)} {name}" for x in plan.suggestions]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", help="config files and key=value overrides")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one device in GiB (default 80)")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="tokens of a rendered prompt (default: data.max_prompt_tokens, the longest admitted)")  # fmt: skip
    parser.add_argument("--shared-vocab", type=int, default=None, metavar="N",
                        help="|V∩| of the two tokenizers, as `lightning-opd align` prints it, for the restricted teacher "
                             "columns (default: min of the two vocabularies, an upper bound)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    parser.set_defaults(overrides=[])  # main() puts key=value items given after the options here


def run_plan(args: argparse.Namespace) -> int:
    items = list(args.items) + list(args.overrides)
    files, overrides = [x for x in items if "=" not in x], [x for x in items if "=" in x]
    shared = getattr(args, "shared_vocab", None)
    if args.gpu_memory <= 0 or (args.prompt_tokens is not None and args.prompt_tokens < 0) or (shared is not None and shared < 0):
        print("lightning-opd plan: --gpu-memory must be > 0, --prompt-tokens and --shared-vocab >= 0", file=sys.stderr)
        return 2
    plan = make_plan(load(*files, overrides=overrides), args.gpu_memory, args.prompt_tokens, shared)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0
