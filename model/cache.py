"""Inference state for the hybrid stack: a KV cache per attention layer, conv + SSM states per Mamba layer.

Each entry of `layers` is the dict the layer's mixer reads and updates (see model/attention.py, model/mamba.py);
MLP and MoE layers keep no state. The SSM state is fp32 always (fp16 state loses accuracy, SPEC section 2).
"""

import torch


class InferenceCache:
    def __init__(self, model, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        cfg = model.cfg
        device = device or model.lm_head.weight.device
        self.layers = []
        for block in model.backbone.layers:
            self.layers.append(_layer_state(block.kind, block.mixer, cfg, batch_size, max_len, dtype, device))
        self.mtp = None
        if model.mtp is not None:
            self.mtp = _layer_state("attention", model.mtp.layers[0].mixer, cfg, batch_size, max_len, dtype, device)

    def snapshot(self) -> list:
        """A deep copy of every layer state (to roll back after a rejected draft)."""
        return [None if s is None else {k: v.clone() for k, v in s.items()} for s in self.layers]

    def restore(self, snapshot: list):
        for state, saved in zip(self.layers, snapshot):
            if state is not None:
                for key, value in saved.items():
                    state[key] = value.clone()


def _layer_state(kind, mixer, cfg, batch, max_len, dtype, device):
    if kind == "attention":
        kv_heads = mixer.k_proj.weight.shape[0] // mixer.head_dim
        shape = (batch, kv_heads, max_len, mixer.head_dim)
        return {"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device),
                "pos": torch.zeros(batch, dtype=torch.long, device=device)}
    if kind == "mamba":
        conv_dim, _, kernel = mixer.conv1d.weight.shape
        heads = mixer.dt_bias.shape[0]
        return {"conv": torch.zeros(batch, conv_dim, kernel - 1, dtype=dtype, device=device),
                "ssm": torch.zeros(batch, heads, mixer.head_dim, cfg.ssm_state_size, dtype=torch.float32, device=device)}
    return None
