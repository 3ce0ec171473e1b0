"""LatentForge training: the pretrain.py / sft.py entry points, the trainer loop and its parts (docs/INTERFACES.md)."""
