"""`r1 distill`: SFT of a small dense student on teacher data (the r1 sft loop), with the teacher's logits when
distill.teacher is given."""

from __future__ import annotations

from r1cli.config import Config
from r1cli.distill.loss import DistillLoss, load_teacher
from r1cli.sft.loop import run_sft


def run_distill(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    if not cfg.distill.teacher:
        return run_sft(cfg, resume=resume, overwrite=overwrite)

    def loss_for(trainer):
        teacher = load_teacher(cfg, trainer)
        return lambda tokens: DistillLoss(teacher, tokens, cfg.distill, trainer.tokenizer.pad_token_id)

    return run_sft(cfg, resume=resume, overwrite=overwrite, loss_for=loss_for)
