"""Types the mixers share: a layer's inference state, the decoding cache and the parallel layout's mixer context.

They are Protocols so the model names what it calls without importing the engine (`model/engine`) or the training
layouts (`train/parallel`) that implement them.
"""

from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from .mamba import Mamba2Mixer

# One layer's decoding state (attention: "k", "v", "pos"; Mamba: "conv", "ssm" and the flags "recurrent",
# "keep_per_token"): tensors and flags under fixed keys, so the values are Any.
LayerState = dict[str, Any]


class LayerCache(Protocol):
    """What `HybridModel.forward(cache=...)` reads: `layers[i]` is layer i's state (None for stateless layers)."""

    @property
    def layers(self) -> Sequence[Optional[LayerState]]: ...


class MixerContext(Protocol):
    """Context parallelism's view of the current micro-batch (`train.parallel.context_parallel`): the mixers run
    their sequence-wide steps through it."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def mamba_mix(self, mixer: "Mamba2Mixer", xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor: ...
