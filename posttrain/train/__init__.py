"""What every training command shares, below the recipes and the RL loop: the run directory (run.py,
control.py), checkpoints, the metrics file and the reports, the optimizer step, held-out evaluation."""
