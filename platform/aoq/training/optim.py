"""Optimizer and learning-rate schedule from the ``optim`` config section."""

from __future__ import annotations

import torch

from aoq.config import OptimConfig


def build_optimizer(
    cfg: OptimConfig, model: torch.nn.Module
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with step decay, as VSE++/SCAN/VSRN train: lr x gamma every N epochs.

    The scheduler is stepped once per epoch.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=cfg.lr_decay_epochs, gamma=cfg.lr_decay_gamma
    )
    return optimizer, scheduler
