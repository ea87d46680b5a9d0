import pytest
import torch

from encore_pl.edited import EditedLayers
from encore_pl.layouts import LocatedModel
from encore_pl.models import load_model_and_tokenizer


def test_locates_down_matrix_and_applies_increment(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    lm = LocatedModel(model)
    layer = 2
    down = lm.down_proj(layer)
    d_model = model.config.hidden_size
    w = lm.weight_out_in(layer)
    assert w.shape[0] == d_model and w.shape[1] > d_model  # [out, in], whatever the storage
    if model.config.model_type == "gpt2":
        assert lm.down_proj_name(layer) == "transformer.h.2.mlp.c_proj"
        assert down.weight.shape == (w.shape[1], d_model)  # Conv1D stores [in, out]
    else:
        assert lm.down_proj_name(layer) == "model.layers.2.mlp.down_proj"
    # An [out, in] increment D changes the module's output on key k by exactly D k.
    torch.manual_seed(0)
    k = torch.randn(3, w.shape[1])
    d = torch.randn(d_model, w.shape[1]) * 0.01
    before = down(k)
    EditedLayers(lm, [layer]).add(layer, d)
    after = down(k)
    torch.testing.assert_close(after - before, k @ d.T, atol=1e-5, rtol=1e-4)


def test_out_of_range_layer_is_a_clear_error(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    with pytest.raises(ValueError, match=r"layers \[4, 9\] out of range: .* has 4 layers \(0..3\)"):
        LocatedModel(model).check_layers([2, 3, 4, 9])


def test_unsupported_architecture_names_supported_ones():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, is_decoder=True))
    with pytest.raises(ValueError, match="unsupported architecture 'bert'.*supported model types: .*gpt2.*llama"):
        LocatedModel(model)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "nope"))


def tiny(model_type: str):
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPTJConfig, GPTJForCausalLM, GPTNeoXConfig,
                              GPTNeoXForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    if model_type == "gptj":
        return GPTJForCausalLM(GPTJConfig(vocab_size=64, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=64))
    if model_type == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**small))
    if model_type == "gemma3_text":
        return Gemma3ForCausalLM(Gemma3TextConfig(**small, num_key_value_heads=2, head_dim=8))
    cls, cfg = {"mistral": (MistralForCausalLM, MistralConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[model_type]
    return cls(cfg(**small, num_key_value_heads=2))


@pytest.mark.parametrize("model_type,name", [
    ("gptj", "transformer.h.1.mlp.fc_out"), ("gpt_neox", "gpt_neox.layers.1.mlp.dense_4h_to_h"),
    ("gemma3_text", "model.layers.1.mlp.down_proj"), ("mistral", "model.layers.1.mlp.down_proj"),
    ("qwen2", "model.layers.1.mlp.down_proj"),
])
def test_other_layouts_locate_the_down_matrix(model_type, name):
    model = tiny(model_type).eval()
    lm = LocatedModel(model)
    assert model.config.model_type == model_type and lm.num_layers == 3
    assert lm.down_proj_name(1) == name and lm.down_proj(1) is model.get_submodule(name)
    w = lm.weight_out_in(1)
    assert w.shape == (32, w.shape[1]) and w.shape[1] > 32
    # the final hidden state and the head give the model's own logits
    ids = torch.randint(0, 64, (2, 5))
    hidden, _ = lm.final_hidden(input_ids=ids, use_cache=False)
    torch.testing.assert_close(lm.logits(hidden), model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
