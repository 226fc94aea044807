"""LARS (You et al., 2017) as SimCLR and BYOL train with it: SGD with momentum where each weight tensor's
update is scaled by the trust ratio eta ||w|| / ||g + wd w||. Biases and normalisation parameters (the
groups with no weight decay, `wd_mult` 0) get neither weight decay nor the trust ratio (SimCLR Appendix B.1;
BYOL Appendix C). The learning rate is applied inside the momentum, as SimCLR's LARSOptimizer does."""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, momentum: float = 0.9, eta: float = 0.001,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "eta": eta, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            adapt = group.get("wd_mult", 1.0) != 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                lr = group["lr"]
                if adapt:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, 1.0)
                    g = g * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                v = state["momentum_buffer"]
                v.mul_(group["momentum"]).add_(g, alpha=lr)  # v <- m v + lr * trust * (g + wd w)
                p.sub_(v)
        return loss
