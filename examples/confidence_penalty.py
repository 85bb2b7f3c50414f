"""Confidence penalty (Pereyra et al., "Regularizing Neural Networks by Penalizing Confident Output
Distributions", ICLR 2017 workshop, arXiv 1701.06548): ``L = CE(z, y) − β·H(softmax(z))``. Default β=0.1."""
import torch
from pydantic import Field

import selfkd
from selfkd.methods.losses import cross_entropy


class Params(selfkd.Params):
    beta: float = Field(0.1, ge=0, description="weight β of the entropy bonus")


@selfkd.register_method
class ConfidencePenalty(selfkd.Method):
    """``L = CE(z, y) − β·H(softmax(z))``, H the entropy per row, mean over rows. No state."""

    name = "cpen"
    formula = "CE(z, y) − β·H(softmax(z))"
    Params = Params

    def loss(self, logits, target, index=None):
        ce = cross_entropy(logits, target)
        logp = torch.log_softmax(logits.float(), dim=1)
        entropy = -(logp.exp() * logp).sum(dim=1).mean()
        return selfkd.StepOutput(ce - self.hp.beta * entropy, {"ce": ce.detach(), "entropy": entropy.detach()},
                                 logits, target)
