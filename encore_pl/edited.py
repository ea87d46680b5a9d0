"""The edited matrices: base weights, cumulative increments, running sums of previous keys.

Each edited down matrix is always `round(W_base + cumulative)`: the cumulative increment of all
batches so far is kept in float32 and the weight is set from it after every batch, in the
model's own dtype. In bfloat16 an increment of ~1e-4 next to weights of ~1e-2 would lose about a
fifth of itself each time it is added to the weight; here rounding happens once, never
accumulating over batches. In float32 the weight is the same sum, rounded the same way.

Where things live (no tensor is created without a device):
- `base_<l>` and `increment_<l>` are buffers: they follow the model to its device with it.
- `key_sums` (K_prev K_prev^T per layer, float64, d_ff x d_ff) are used only by the process
  that solves (process 0) and live on `state_device` (the model's device, or "cpu" to keep them
  in host memory); `place_key_sums` puts them there, other processes hold none.
"""

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .layouts import LocatedModel


class EditedLayers(nn.Module):
    def __init__(self, lm: LocatedModel, layers: list[int]):
        super().__init__()
        self.lm, self.layers = lm, list(layers)
        for l in self.layers:
            w = lm.weight_out_in(l).detach()
            self.register_buffer(f"base_{l}", w.clone(), persistent=False)
            self.register_buffer(f"increment_{l}", torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        self.key_sums: dict[int, torch.Tensor] = {}

    def base(self, layer: int) -> torch.Tensor:
        """The base weight [out, in], in the model's dtype."""
        return getattr(self, f"base_{layer}")

    def increment(self, layer: int) -> torch.Tensor:
        """The cumulative increment [out, in], float32."""
        return getattr(self, f"increment_{layer}")

    @torch.no_grad()
    def add(self, layer: int, d: torch.Tensor) -> None:
        """Add one batch's increment D [out, in] (any dtype, any device) and set the weight."""
        inc = self.increment(layer)
        inc.add_(d.to(device=inc.device, dtype=inc.dtype))
        self.set_weight(layer)

    @torch.no_grad()
    def set_weight(self, layer: int) -> None:
        """weight := round(base + cumulative increment), in the weight's dtype."""
        w = self.lm.weight_out_in(layer)  # a view of the stored weight (GPT-2: transposed)
        total = self.base(layer).float() + self.increment(layer)
        w.copy_(total.to(device=w.device, dtype=w.dtype))

    @contextmanager
    def unedited(self) -> Iterator[None]:
        """The base weights in the model for the duration (e.g. to compute C0, which is always
        the unedited model's); round(base + cumulative increment) again afterwards."""
        with torch.no_grad():
            for l in self.layers:
                self.lm.weight_out_in(l).copy_(self.base(l))
        try:
            yield
        finally:
            for l in self.layers:
                self.set_weight(l)

    def increments(self) -> dict[str, torch.Tensor]:
        """{module name: cumulative increment [out, in]}, float32 on the CPU (what a patch holds)."""
        return {self.lm.down_proj_name(l): self.increment(l).detach().cpu().contiguous() for l in self.layers}

    def base_weights(self) -> dict[str, torch.Tensor]:
        """{module name: base weight [out, in]}, float32 on the CPU (what `base_sha256` hashes)."""
        return {self.lm.down_proj_name(l): self.base(l).detach().float().cpu().contiguous() for l in self.layers}

    @torch.no_grad()
    def load_increments(self, increments: dict[int, torch.Tensor]) -> None:
        """Set every layer's cumulative increment (e.g. from a checkpoint) and its weight."""
        for l in self.layers:
            self.increment(l).copy_(increments[l])
            self.set_weight(l)

    def place_key_sums(self, device: Optional[torch.device], loaded: Optional[dict[int, torch.Tensor]] = None) -> None:
        """Key sums on `device` (None: this process holds none): the loaded ones, or zeros."""
        if device is None:
            self.key_sums = {}
            return
        d_ff = self.base(self.layers[0]).shape[1]
        self.key_sums = {
            l: (loaded[l].to(device, torch.float64, copy=True) if loaded is not None
                else torch.zeros(d_ff, d_ff, dtype=torch.float64, device=device))
            for l in self.layers
        }

    @torch.no_grad()
    def add_keys(self, layer: int, keys: torch.Tensor) -> None:
        """K_prev K_prev^T += K K^T for keys K [d_ff, n] (on the process that holds the sums)."""
        if layer in self.key_sums:
            s = self.key_sums[layer]
            k = keys.to(s.device, torch.float64)
            s.addmm_(k, k.T)
