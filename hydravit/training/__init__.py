"""HydraViT training: config, data, head sampling, the step objective, checkpoints and the loop.

Layout: ``config`` (timm train.py arguments + YAML), ``data`` (timm datasets/loaders), ``sampler`` (which head
counts a step draws), ``objective`` (what one optimizer step computes: subnetworks, losses, teacher), ``teacher``
(the external teacher), ``builders`` (model, AMP, loss, device), ``checkpointing`` (exact resume), ``report``
(meters and tables), ``loop`` (epochs, validation, checkpoints, logs).
"""
from .objective import StepObjective, hard_distillation_loss, soft_distillation_loss
from .sampler import HeadSampler

__all__ = ['HeadSampler', 'StepObjective', 'hard_distillation_loss', 'soft_distillation_loss']
