"""The only layer that reads Hydra configs: it composes data, models, losses and trainers into tasks."""
