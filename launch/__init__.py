"""Launch helpers: Slurm scripts, Ray on Slurm, and a torchrun whose SIGTERM means save-and-stop (torchrun.py)."""
