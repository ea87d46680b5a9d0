"""Where an edit goes: the modules of each supported architecture.

A layout names, for one model family, the MLP "down" matrix of a layer (keys in, values out),
the residual-stream output of a layer, the final norm and the vocabulary head.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Layout:
    layers: str  # the list of decoder blocks, e.g. "model.layers"
    down_proj: str  # the MLP down matrix inside a block, e.g. "mlp.down_proj"
    transposed: bool = False  # GPT-2 Conv1D stores the weight as [in, out]


LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout("transformer.h", "mlp.c_proj", transposed=True),
    "gptj": Layout("transformer.h", "mlp.fc_out"),
    "gpt_neox": Layout("gpt_neox.layers", "mlp.dense_4h_to_h"),
    "llama": Layout("model.layers", "mlp.down_proj"),
    "mistral": Layout("model.layers", "mlp.down_proj"),
    "qwen2": Layout("model.layers", "mlp.down_proj"),
    "qwen3": Layout("model.layers", "mlp.down_proj"),
    "gemma3_text": Layout("model.layers", "mlp.down_proj"),
}


class LocatedModel:
    """A causal LM with its edit sites located: blocks, down matrices, final hidden state, head."""

    def __init__(self, model: nn.Module):
        model_type = model.config.model_type
        if model_type not in LAYOUTS:
            raise ValueError(
                f"unsupported architecture {model_type!r} ({type(model).__name__}); "
                f"supported model types: {', '.join(sorted(LAYOUTS))}"
            )
        self.model = model
        self.layout = LAYOUTS[model_type]
        self.blocks: nn.ModuleList = model.get_submodule(self.layout.layers)
        self.num_layers = len(self.blocks)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def check_layers(self, layers: list[int]) -> None:
        bad = [l for l in layers if not 0 <= l < self.num_layers]
        if bad:
            raise ValueError(
                f"layers {bad} out of range: {self.model.config.model_type} has "
                f"{self.num_layers} layers (0..{self.num_layers - 1})"
            )

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def down_proj(self, layer: int) -> nn.Module:
        return self.blocks[layer].get_submodule(self.layout.down_proj)

    def down_proj_name(self, layer: int) -> str:
        return f"{self.layout.layers}.{layer}.{self.layout.down_proj}"

    def weight(self, layer: int) -> torch.Tensor:
        """The down matrix as stored (GPT-2: [in, out])."""
        return self.down_proj(layer).weight

    def weight_out_in(self, layer: int) -> torch.Tensor:
        """The down matrix as [d_model, d_ff] ("out x in"), whatever the storage."""
        w = self.weight(layer)
        return w.T if self.layout.transposed else w

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from final (already normed) hidden states."""
        logits = self.model.get_output_embeddings()(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def final_hidden(self, **inputs) -> tuple[torch.Tensor, object]:
        """Run the base model (no vocabulary head); return last hidden state and cache."""
        out = self.model.base_model(**inputs)
        return out.last_hidden_state, getattr(out, "past_key_values", None)
