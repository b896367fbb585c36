"""distill: r1 distill's teacher and loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from r1cli.config.fields import bounded


@dataclass
class DistillConfig:
    """r1 distill: SFT of a small dense student on teacher data, optionally with the teacher's logits."""

    student: str = ""  # the preset (configs/students/NAME.yaml) or local folder the run was resolved from
    architecture: str = ""  # what the preset expects at model.path (printed by --dry-run)
    teacher: str = ""  # a local folder with the student's tokenizer: logit distillation; "": plain SFT
    kl_weight: float = bounded(0.5, 0.0, 1.0)  # loss = (1 - w) NLL + w KL
    kl_direction: Literal["forward", "reverse"] = "forward"  # KL(teacher || student) or KL(student || teacher)
    # logit distillation: the softmax temperature of teacher and student
    temperature: float = bounded(1.0, 0.0, above=True)
    chunk_tokens: int = bounded(1024, 1)  # tokens per [chunk x V] logits block; [N x V] is never whole
