"""When offline negatives are (re)mined and which loss variant each epoch uses.

``negatives.source=mine``: epochs ``0 .. warmup_epochs-1`` train with ``triplet``; at the
start of epoch ``warmup_epochs`` tables are mined from the current model and the chosen
variant takes over; tables are re-mined every ``refresh_every`` epochs after that
(0 = never). ``checkpoint:`` and ``tables:`` sources have tables from the start and,
as in the paper, never refresh them.
"""

from __future__ import annotations

import dataclasses

from aoq.config import LossConfig, NegativesConfig, parse_negative_source


def uses_offline(loss: LossConfig) -> bool:
    return loss.variant != "triplet"


def mines_during_training(neg: NegativesConfig, loss: LossConfig) -> bool:
    return uses_offline(loss) and parse_negative_source(neg.source)[0] == "mine"


def mine_at_epoch_start(epoch: int, neg: NegativesConfig, loss: LossConfig) -> bool:
    """Whether fresh tables are mined before training epoch ``epoch`` (0-based)."""
    if not mines_during_training(neg, loss) or epoch < neg.warmup_epochs:
        return False
    since = epoch - neg.warmup_epochs
    return since == 0 or (neg.refresh_every > 0 and since % neg.refresh_every == 0)


def loss_config_for_epoch(epoch: int, neg: NegativesConfig, loss: LossConfig,
                          have_tables: bool) -> LossConfig:
    """The loss section epoch ``epoch`` trains with: the variant from
    :func:`variant_for_epoch`, and max-violation only after its warm-up."""
    return dataclasses.replace(
        loss,
        variant=variant_for_epoch(epoch, neg, loss, have_tables),
        max_violation=loss.max_violation and epoch >= loss.max_violation_warmup_epochs,
    )


def variant_for_epoch(epoch: int, neg: NegativesConfig, loss: LossConfig,
                      have_tables: bool) -> str:
    """The loss variant epoch ``epoch`` trains with: the configured one once tables exist,
    ``triplet`` before (warm-up)."""
    if not uses_offline(loss):
        return "triplet"
    return loss.variant if have_tables else "triplet"
