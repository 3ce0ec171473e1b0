"""Hot ops of the model, each twice: a pure-PyTorch reference ``<op>_ref`` (any device, the ground truth)
and a dispatcher ``<op>`` that takes the Triton fast path on CUDA tensors and the reference elsewhere.

Import the op modules directly (``from kernels.ssd import ssd_scan``); this package file stays light on
purpose so importing ``kernels`` never pulls in Triton.

Set ``LATENTFORGE_KERNELS=ref`` to force the references everywhere (debugging, numerics comparisons).
"""
