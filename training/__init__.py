"""What train.py and eval.py run besides the model: torchrun (DDP, FSDP2), CLIP-style encoder pretraining, the metrics."""
