"""Model FLOPs utilisation: achieved TFLOP/s per device against the device's dense BF16 peak.

FLOPs per token come from `model.params.training_flops_per_token` (Megatron's hybrid formula), so the numbers
compare with Megatron's and NeMo's reports. On CPU, or on a GPU missing from the table, the peak is unknown and
TFLOP/s and MFU print as n/a.
"""

from __future__ import annotations

from typing import Optional

import torch

# dense (no sparsity) BF16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets. Checked in order: the first
# fragment found in the device name wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
)


def peak_tflops_for(device_name: str) -> Optional[float]:
    for fragment, peak in PEAK_BF16_TFLOPS:
        if fragment.lower() in device_name.lower():
            return peak
    return None


def device_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device))


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
