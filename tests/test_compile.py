"""--compile: which modules get compiled, when layers falls back, and that only the training step runs
compiled (everything else eager). CPU, no compilation happens here: torch.compile is lazy and the
stance outside the training step is force_eager."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from harness import cli, train


@pytest.fixture
def tiny_llama():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    yield LlamaForCausalLM(config).eval()
    torch.compiler.set_stance("default")  # compile_modules sets force_eager for the whole process


@pytest.mark.parametrize("requested, checkpointing, chosen", [
    ("off", False, "off"), ("off", True, "off"), ("pointwise", True, "pointwise"),
    ("layers", False, "layers"), ("layers", True, "pointwise"),  # the recompute would not replay the graph
])
def test_choose_compile(requested, checkpointing, chosen):
    assert train.choose_compile(requested, checkpointing) == chosen


def test_layers_compiles_each_decoder_layer_forward(tiny_llama):
    layers = list(tiny_llama.model.layers)
    assert train.compile_modules(tiny_llama, "layers") == 3
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in layers)
    assert "forward" not in vars(tiny_llama.model.norm)  # only the decoder layers


def test_pointwise_compiles_each_mlp_and_rmsnorm(tiny_llama):
    # per layer: the MLP and two norms; plus the final norm
    assert train.compile_modules(tiny_llama, "pointwise") == 3 * 3 + 1
    assert train.compile_modules(tiny_llama, "off") == 0
    with pytest.raises(ValueError, match="compile scope 'everything'"):
        train.compile_modules(tiny_llama, "everything")


def test_outside_the_training_step_the_compiled_layers_run_eagerly(tiny_llama):
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        expected = tiny_llama(ids).logits
        train.compile_modules(tiny_llama, "layers")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        assert torch.equal(tiny_llama(ids).logits, expected)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"], "a graph was compiled outside the step"


def test_the_training_step_alone_runs_under_the_compiling_stance(tiny_llama):
    from torch._dynamo import eval_frame

    train.compile_modules(tiny_llama, "pointwise")
    assert eval_frame._stance.stance == "force_eager"
    with train.compiled_stance(10):
        assert eval_frame._stance.stance == "default"
    assert eval_frame._stance.stance == "force_eager"
    with train.compiled_stance(0):  # nothing compiled: the stance is left alone
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
    from harness.settings import cli_overrides

    args = cli.build_parser().parse_args(["--models", "x"])
    args.compile = stored
    assert cli_overrides(args).get("compile") == given
