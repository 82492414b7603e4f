"""Interventions trained at one layer (a residual bias vector, LoRA) compared with steering vectors."""

from steerlab.finetune.train import TrainConfig, TrainedIntervention, train_bias, train_lora

__all__ = ["TrainConfig", "TrainedIntervention", "train_bias", "train_lora"]
