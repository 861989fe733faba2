"""Studies run as `python -m studies.NAME`: the ablation study, the layer probe, the lookup oracle."""
