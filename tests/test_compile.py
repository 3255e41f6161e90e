"""--compile: which modules get compiled, that only the training step runs compiled (everything else
eager), and that the compiled paths compute what the eager ones do: whole layers under activation
checkpointing, the loss chunks, Gemma 3n's hoisted coefficient clamp. CPU; the layers and loss
equality tests compile for real (the layers one without inductor's code generation)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness.gate import cli, registry
from harness.job import compiling, loss
from harness.models import weights


@pytest.fixture
def tiny_llama():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    yield LlamaForCausalLM(config).eval()
    torch.compiler.set_stance("default")  # compile_modules sets force_eager for the whole process


def test_layers_compiles_each_decoder_layer_forward(tiny_llama):
    layers = list(tiny_llama.model.layers)
    assert compiling.compile_modules(tiny_llama, "layers") == 3
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in layers)
    assert "forward" not in vars(tiny_llama.model.norm)  # only the decoder layers


def test_pointwise_compiles_each_mlp_and_rmsnorm(tiny_llama):
    # per layer: the MLP and two norms; plus the final norm
    assert compiling.compile_modules(tiny_llama, "pointwise") == 3 * 3 + 1
    assert compiling.compile_modules(tiny_llama, "off") == 0
    with pytest.raises(ValueError, match="compile scope 'everything'"):
        compiling.compile_modules(tiny_llama, "everything")


def test_outside_the_training_step_the_compiled_layers_run_eagerly(tiny_llama):
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        expected = tiny_llama(ids).logits
        compiling.compile_modules(tiny_llama, "layers")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        assert torch.equal(tiny_llama(ids).logits, expected)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"], "a graph was compiled outside the step"


def test_the_training_step_alone_runs_under_the_compiling_stance(tiny_llama):
    from torch._dynamo import eval_frame

    compiling.compile_modules(tiny_llama, "pointwise")
    assert eval_frame._stance.stance == "force_eager"
    with compiling.compiled_stance(10):
        assert eval_frame._stance.stance == "default"
    assert eval_frame._stance.stance == "force_eager"
    with compiling.compiled_stance(0):  # nothing compiled: the stance is left alone
        assert eval_frame._stance.stance == "force_eager"


def test_the_bare_flag_is_pointwise_and_a_scope_can_be_named():
    parser = cli.build_parser()
    assert parser.parse_args(["--models", "x", "--compile"]).compile == "pointwise"
    assert parser.parse_args(["--models", "x", "--compile", "layers"]).compile == "layers"
    assert parser.parse_args(["--models", "x"]).compile is None  # not given: the run's default (off)
    with pytest.raises(SystemExit):
        parser.parse_args(["--models", "x", "--compile", "fast"])


@pytest.mark.parametrize("stored, given", [(False, None), (True, "pointwise"), ("layers", "layers"), (None, None)])
def test_a_run_recorded_with_the_old_flag_resumes_with_its_scope(stored, given):
    """run.json of runs from before the scopes holds `compile: true/false` (--resume adopts it)."""
    from harness.gate.options import training_values

    assert training_values({"compile": stored}).get("compile") == given


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids, use_cache=False)  # as the trainer calls it
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_layers_under_checkpointing_compute_what_eager_checkpointing_does(tiny_llama):
    """layers + activation checkpointing: the checkpoint runs inside each compiled layer (transformers'
    own checkpointing off); loss and every gradient equal the eager checkpointed model's."""
    import copy

    ids = torch.randint(0, 64, (2, 12))
    eager = copy.deepcopy(tiny_llama).train()
    eager.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled = copy.deepcopy(tiny_llama).train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []

    def recording_aot_eager(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    # aot_eager: dynamo's graphs, the checkpoint inside them and AOT autograd's backward, without
    # inductor's C++ code generation (35 s on a CI core; the GPU runs use inductor)
    assert (
        compiling.compile_modules(compiled, "layers", activation_checkpointing=True, backend=recording_aot_eager) == 3
    )
    expected_loss, expected_grads = _loss_and_grads(eager, ids)
    with compiling.compiled_stance(3):
        got_loss, got_grads = _loss_and_grads(compiled, ids)
    assert graphs, "nothing was compiled"
    # a break inside the checkpoint sends the layer back to eager (transformers 5.25's kernels context
    # variable did: harness.job.compiling.tracing_checkpoint_side_effects)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    # equal values alone would not show it: the layers ran checkpointed, inside the compiled graph
    assert all("tag_activation_checkpoint" in graph for graph in graphs)
    assert torch.allclose(got_loss, expected_loss, atol=1e-5)
    assert expected_grads.keys() == got_grads.keys()
    for name, grad in expected_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-5), name


@pytest.mark.parametrize("cap", [None, 3.0])
def test_compiled_loss_chunks_match_the_eager_ones(cap):
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    labels[0, :3] = loss.IGNORE_INDEX
    results = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        hidden.grad = weight.grad = None
        total = loss.chunked_cross_entropy_sum(
            hidden, weight, labels, chunk_tokens=4, final_logit_softcapping=cap, compiled=compiled
        )
        total.backward()
        results.append((total.detach(), hidden.grad.clone(), weight.grad.clone()))
    reference = torch.nn.functional.cross_entropy(
        loss.softcap(hidden.detach().reshape(-1, 16) @ weight.detach().t(), cap), labels.reshape(-1), reduction="sum"
    )
    assert torch.allclose(results[0][0], reference, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2, "the compiled run ran eagerly"
    for eager_value, compiled_value in zip(*results):
        assert torch.allclose(compiled_value, eager_value, atol=1e-5)


def test_gemma3n_coefficient_clamp_hoisted_out_of_the_layer_keeps_the_loss():
    """The hoisted clamp leaves transformers' forward values unchanged (the same loss on the same
    batch), with coefficients beyond the clip in both matrices."""
    import copy

    from transformers import AutoModelForCausalLM

    config = weights.tiny_config(registry.lookup("gemma-3n-E4B-it")).text_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    clip = config.altup_coef_clip
    altups = [m for m in model.modules() if hasattr(m, "prediction_coefs")]
    assert altups and clip
    with torch.no_grad():
        for altup in altups:
            altup.prediction_coefs.weight.normal_(0, 2 * clip)
            altup.correction_coefs.weight.normal_(0, 2 * clip)
    ids = torch.randint(0, config.vocab_size, (1, 10))
    hoisted = copy.deepcopy(model)
    expected = model(ids, labels=ids).loss  # transformers clamps the prediction coefficients in place here
    clamp = compiling.hoist_coefficient_clamps(hoisted)
    clamp()
    assert all(m.config.altup_coef_clip is None for m in hoisted.modules() if hasattr(m, "prediction_coefs"))
    assert config.altup_coef_clip == clip  # the model's own config is left alone
    for altup in hoisted.modules():
        if hasattr(altup, "correction_coefs"):
            assert altup.correction_coefs.weight.abs().max() <= clip
    assert torch.allclose(hoisted(ids, labels=ids).loss, expected, atol=1e-6)
    assert (
        compiling.hoist_coefficient_clamps(
            AutoModelForCausalLM.from_config(weights.tiny_config(registry.lookup("gemma-3-4b-it")).text_config)
        )()
        is None
    )  # no AltUp: nothing to do


@pytest.mark.parametrize("name", ["llama", "gemma-3n-E4B-it"])
def test_steps_under_compile_feed_rows_of_one_length_with_the_same_loss_and_gradients(tiny_llama, name):
    """Under --compile (the flag alone decides; nothing is compiled here) every packed row is filled
    to the token budget: inductor guards on the length it compiled for, and a shorter row compiled
    every layer again. The step's loss and gradient norm stay the batch's; on tiny gemma-3n a filler
    of pad tokens (a zero embedding row) made the gradients NaN."""
    import copy
    import types

    from harness.job import data as data_lib
    from harness.job.data import TokenizedSample
    from harness.job.distributed import DistContext
    from harness.job.train import TrainableLM, Trainer, train_step
    from harness.models import loading

    lm = tiny_llama if name == "llama" else loading.load_model(registry.lookup(name), "tiny").model
    torch.manual_seed(0)
    samples = [
        TokenizedSample(torch.randint(3, 64, (n,)).tolist(), [-100] * (n - 3) + [5, 6, -100]) for n in (9, 14, 6)
    ]
    dataset = types.SimpleNamespace(samples=samples)
    (step_plan,) = data_lib.plan_steps(samples, 1, 64)
    cpu = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    steps = {}
    for scope in ("off", "layers"):
        model = TrainableLM(copy.deepcopy(lm).train())
        lengths = []
        model.register_forward_pre_hook(
            lambda module, args, kwargs, lengths=lengths: lengths.append(kwargs["input_ids"].shape[1]),
            with_kwargs=True,
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        cfg = types.SimpleNamespace(packing=True, grad_clip=1.0, compile=scope, max_tokens_per_gpu=64)
        trainer = Trainer(model, torch.optim.SGD(trainable, lr=0.0), trainable, dataset, cfg, cpu, pad_id=0)
        loss, grad_norm, tokens, _ = train_step(trainer, step_plan)
        steps[scope] = (lengths, loss, grad_norm, tokens)
    assert steps["off"][0] == [29] and steps["layers"][0] == [64]
    assert steps["layers"][3] == steps["off"][3] == 29  # the filler is not counted as trained tokens
    assert steps["layers"][1] == pytest.approx(steps["off"][1], rel=1e-5)
    assert steps["layers"][2] == pytest.approx(steps["off"][2], rel=1e-4) and steps["off"][2] > 0


def test_compiled_code_is_kept_in_the_harness_cache_unless_told_otherwise(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setenv("SFT_HARNESS_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "recorded")  # so monkeypatch restores what was there
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    compiling.compile_modules(tiny_llama, "off")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # nothing compiled, nothing set
    compiling.compile_modules(tiny_llama, "pointwise")
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    assert inductor_cache_dir() == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compiling.compile_modules(tiny_llama, "layers")
    assert inductor_cache_dir() == str(tmp_path / "mine")
