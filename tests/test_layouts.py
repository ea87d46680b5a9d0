import pytest
import torch
from transformers import AutoModelForCausalLM

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
    lm.add_to_weight(layer, d)
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
