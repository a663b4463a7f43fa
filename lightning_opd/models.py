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

import functools
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from lightning_opd.config import ModelConfig, TinyModelConfig, TokenizerConfig, looks_local
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


def load_tokenizer(
    cfg: TokenizerConfig, model_path: str | None = None, *, setting: str | None = None
) -> PreTrainedTokenizerFast:
    """From a fixture, a tokenizer.json, a directory or a hub id (cfg.source == 'train' is
    handled by the caller, which has the task text). `setting` names the config key the source
    came from (`student.tokenizer.source`, `student.path`), for the error messages."""
    source = cfg.source
    if source == "model":
        source = model_path or ""
    if source.startswith("fixture:"):
        from lightning_opd.fixtures import load_fixture_tokenizer

        tok = load_fixture_tokenizer(source.removeprefix("fixture:"))
    elif source.endswith(".json"):
        tok = _tokenizer_file(source, setting)
    else:
        what = "tokenizer of model" if cfg.source == "model" else "tokenizer"  # the user gave a model
        tok = from_pretrained(AutoTokenizer.from_pretrained, source, what, setting, TOKENIZER_FILES)
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    set_eos(tok, cfg)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenizer_file(source: str, setting: str | None) -> PreTrainedTokenizerFast:
    """A tokenizer.json file (with tokenizer_config.json beside it, if there is one)."""
    path = Path(source).expanduser()
    named = _named("tokenizer", source, setting)
    if not path.is_file():
        raise ModelLoadError(f"{named}: no such file; give a tokenizer.json, a tokenizer folder, a hub id or fixture:NAME")
    beside = path.parent / "tokenizer_config.json"  # special tokens live there
    try:
        return (PreTrainedTokenizerFast.from_pretrained(path.parent) if beside.is_file()
                else PreTrainedTokenizerFast(tokenizer_file=str(path)))  # fmt: skip
    except Exception as err:  # not JSON, or JSON that is not a tokenizer
        raise ModelLoadError(f"{named}: not a readable tokenizer file ({_first_line(err)})") from None


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


# --- local folders and hub ids ----------------------------------------------------------------

# what a folder must hold (any one of each group; globs) before it is handed to transformers,
# whose own errors for a wrong folder name neither the folder's problem nor the fix
MODEL_FILES = {
    "config.json": ("config.json",),
    "weights (*.safetensors or pytorch_model*.bin)": (
        "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    ),
}  # fmt: skip
TOKENIZER_FILES = {
    "tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json, ...)": (
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
        "*.tiktoken",
    ),
}  # fmt: skip
HUB_CHECK_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect well within this
_TRUE = ("1", "ON", "YES", "TRUE")  # how huggingface_hub reads its boolean environment variables


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0][:200]}" if text else err.__class__.__name__


def _named(what: str, source: str, setting: str | None) -> str:
    return f"{what} '{source}'" + (f" ({setting})" if setting else "")


def _looks_like_path(source: str) -> bool:
    """A local path rather than a hub id (`org/name`): see `config.looks_local`; `~` too."""
    return source.startswith("~") or looks_local(source)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it can.

    Offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set, as huggingface_hub reads them) is
    taken at its word. Otherwise one TCP connection to the hub's host (HF_ENDPOINT, or the proxy
    that https requests would go through) is tried, for at most `HUB_CHECK_TIMEOUT_S`: without
    it, an unreachable hub costs tens of seconds of retries per file before transformers gives
    up (about 50 s for one tokenizer here). The connection's answer is kept for the process."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").upper() in _TRUE:
            return f"{name} is set"
    return _hub_connection()


@functools.cache
def _hub_connection() -> str | None:
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):  # the request would go to the proxy
        proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or host, proxied.port or 80
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            with socket.create_connection((host, port), timeout=HUB_CHECK_TIMEOUT_S):
                outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port} cannot be reached: {err.strerror or err}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(HUB_CHECK_TIMEOUT_S)
    return outcome[0] if outcome else f"{host}:{port} did not answer within {HUB_CHECK_TIMEOUT_S:g} s"


def from_pretrained(
    load: Callable[..., Any], source: str, what: str, setting: str | None, needs: dict[str, tuple[str, ...]]
) -> Any:
    """`load(source)` (an `Auto*.from_pretrained`) for a local folder or a hub id, with
    `ModelLoadError`s of one line that name the source, the config key and the fix.

    A folder must hold one file of each group in `needs`. A hub id is looked up in the local
    HF cache only (`local_files_only`) when the hub cannot be reached (`hub_unreachable`), so an
    id that was never downloaded fails in a second or so rather than after retries."""
    named = _named(what, source, setting)
    local = Path(source).expanduser()
    if local.is_dir():
        missing = [group for group, patterns in needs.items()
                   if not any(next(local.glob(pattern), None) for pattern in patterns)]  # fmt: skip
        if missing:
            raise ModelLoadError(
                f"{named}: the folder has no {' and no '.join(missing)}; give a folder written by "
                f"save_pretrained (model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
            )
        try:
            return load(str(local))
        except Exception as err:
            raise ModelLoadError(f"{named}: the folder cannot be loaded ({_first_line(err)})") from None
    if local.exists():
        raise ModelLoadError(f"{named}: a file, not a folder; give the folder that holds it (and its config.json)")
    if _looks_like_path(source):
        raise ModelLoadError(f"{named}: no such folder; give an existing folder written by save_pretrained, or a hub id")
    unreachable = hub_unreachable()
    try:
        return load(source, local_files_only=True) if unreachable else load(source)
    except Exception as err:
        if unreachable:
            raise ModelLoadError(
                f"{named}: not a local folder, and not in the local Hugging Face cache while the hub cannot "
                f"be reached ({unreachable}); download it where there is network (huggingface-cli download "
                f"{source}), or save it to a folder with save_pretrained and give that folder's path"
            ) from None
        raise ModelLoadError(
            f"{named}: not a local folder, and the hub could not give it ({_first_line(err)}); check the id, "
            "or give a folder written by save_pretrained"
        ) from None


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


def load_model(cfg: ModelConfig, *, setting: str | None = None, path: str | None = None) -> torch.nn.Module:
    """A pretrained causal LM from a local folder or a hub id (`path`, else `cfg.path`; a GGUF
    spec's converted folder is passed as `path`); `setting` names the config key it came from
    (`student.path`), for the error messages."""
    load = functools.partial(AutoModelForCausalLM.from_pretrained, dtype=DTYPES[cfg.dtype])
    return from_pretrained(load, path or cfg.path or "", "model", setting, MODEL_FILES)


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
