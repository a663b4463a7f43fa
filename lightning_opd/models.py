"""Models and tokenizers: load from a path or hub id, or build tiny ones on the spot.

Tokenizers come from a tokenizer.json, a directory, a hub id, a packaged fixture
(`fixture:NAME`, see fixtures.py), or are *trained* here with the Rust `tokenizers` library on
task text. Trained tokenizers are byte-level BPE; `digits: split` isolates every digit
(one token per digit, like Llama-3/Qwen), `digits: merge` lets BPE merge digit runs (like
GPT-2), so the embedded default's teacher and student cut numbers differently.

Chat templates: each model renders the prompt with its own template. A tokenizer without one
gets the plain fallback `FALLBACK_TEMPLATE` ("User: {prompt}\nAssistant: "). The trained
tokenizers get two different small templates (student: `<|user|>`-style, teacher: ChatML) so
that the default also exercises per-model rendering.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lightning_opd.config import ModelConfig, TinyModelConfig, TokenizerConfig
from lightning_opd.errors import ModelLoadError

FALLBACK_TEMPLATE = "User: {prompt}\nAssistant: "
STUDENT_SPECIALS = {"eos": "<|endoftext|>", "pad": "<|pad|>", "extra": ["<|user|>", "<|assistant|>"]}
TEACHER_SPECIALS = {"eos": "<|im_end|>", "pad": "<|pad|>", "extra": ["<|im_start|>"]}
TEMPLATES = {
    "<|user|>": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    "<|im_start|>": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}


# --- tokenizers --------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, *, teacher: bool) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`; digits split one by one or merged, per cfg.digits."""
    specials = TEACHER_SPECIALS if teacher else STUDENT_SPECIALS
    special_tokens = [specials["eos"], specials["pad"], *specials["extra"]]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split_digits = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    tok.pre_tokenizer = split_digits if cfg.digits == "split" else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size + 256 + len(special_tokens),
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if cfg.digits == "split_vocab_merge":
        # the vocabulary holds digit-run merges (like the teacher's), but encoding splits digits
        tok.pre_tokenizer = split_digits
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=specials["eos"],
        pad_token=specials["pad"],
        additional_special_tokens=specials["extra"],
    )
    fast.chat_template = cfg.chat_template or TEMPLATES[specials["extra"][0]]
    return fast


def load_tokenizer(cfg: TokenizerConfig, model_path: str | None = None) -> PreTrainedTokenizerFast:
    """From a fixture, a tokenizer.json, a directory or a hub id (cfg.source == 'train' is
    handled by the caller, which has the task text)."""
    source = cfg.source
    if source == "model":
        source = model_path or ""
    if source.startswith("fixture:"):
        from lightning_opd.fixtures import load_fixture_tokenizer

        tok = load_fixture_tokenizer(source.removeprefix("fixture:"))
    elif source.endswith(".json") and Path(source).is_file():
        beside = Path(source).parent / "tokenizer_config.json"  # special tokens live there
        tok = (PreTrainedTokenizerFast.from_pretrained(Path(source).parent) if beside.is_file()
               else PreTrainedTokenizerFast(tokenizer_file=source))  # fmt: skip
    else:
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except Exception as err:
            raise ModelLoadError(
                f"tokenizer '{source}': not a tokenizer.json file, a tokenizer directory, a fixture:NAME, "
                f"or a hub id available {'offline in the HF cache' if _offline() else 'on the hub'} ({err.__class__.__name__})"
            ) from None
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    set_eos(tok, cfg)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# End-of-text tokens, most preferred first: a bare tokenizer.json names no EOS, so the first of
# these among its special tokens is taken. Document ends come before turn ends (a bare file has no
# chat template, so the model is prompted with the plain fallback, as a base model is).
EOS_PREFERENCE = (
    "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<｜end▁of▁sentence｜>", "<|eot_id|>",
    "<|im_end|>", "<end_of_turn>", "<|end|>",
)  # fmt: skip


def set_eos(tok: PreTrainedTokenizerFast, cfg: TokenizerConfig) -> None:
    """`cfg.eos` when given (it must be a token of the vocabulary); else the tokenizer's own EOS;
    else the first of `EOS_PREFERENCE` among its special tokens; else a clear error."""
    if cfg.eos is not None:
        if cfg.eos not in tok.get_vocab():
            raise ModelLoadError(f"tokenizer '{cfg.source}': eos {cfg.eos!r} is not one of its tokens")
        tok.eos_token = cfg.eos
        return
    if tok.eos_token_id is not None:
        return
    specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    found = next((name for name in EOS_PREFERENCE if name in specials), None)
    if found is None:
        raise ModelLoadError(
            f"tokenizer '{cfg.source}' names no EOS token and has none of the usual end-of-text tokens "
            f"({', '.join(EOS_PREFERENCE)}): name one with tokenizer.eos (align: --student-eos / --teacher-eos)"
        )
    tok.eos_token = found


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def render_prompt(tokenizer, prompt: str) -> str:
    """The prompt in the model's own chat template, ready for the response to follow."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return FALLBACK_TEMPLATE.format(prompt=prompt)


# --- models ------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_model(cfg: TinyModelConfig, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A random-initialised Llama- or Qwen2-style causal LM sized to the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if cfg.arch not in classes:
        raise ModelLoadError(f"tiny.arch={cfg.arch!r} is not one of {sorted(classes)}")
    config_cls, model_cls = classes[cfg.arch]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    return model_cls(config)


def load_model(cfg: ModelConfig) -> torch.nn.Module:
    """A pretrained causal LM from a local path or a hub id."""
    try:
        return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=DTYPES[cfg.dtype])
    except Exception as err:
        raise ModelLoadError(
            f"model '{cfg.path}': no such local directory, and not a hub id available "
            f"{'offline in the HF cache' if _offline() else 'on the hub'} ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0][:200]})"
        ) from None


def load_saved_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(directory)


def save_pretrained(model, tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_pretrained_dir(directory: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A model and tokenizer that `save_pretrained` wrote. The tokenizer is read as the exact
    tokenizer.json: AutoTokenizer would pick the class from config.json's model type (Qwen2's
    would replace our pre-tokenizer with Qwen's digit-splitting one)."""
    tok = load_saved_tokenizer(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    return model, tok
