"""The optimiser and its schedule: AdamW over the model's parameter groups, its row-wise form for
tables whose step reads few rows (``RowAdamW``), gradient clipping that counts sparse rows, and
the warm-up + cosine learning-rate schedule. ``pipeline.training.loop.fit`` builds them with
``optimizer_and_schedule``; the speed bench builds them the same way."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from pipeline.config import TrainSettings


def optimizer_and_schedule(model: nn.Module, cfg: TrainSettings, steps_per_epoch: int,
                           param_groups: list[dict[str, Any]] | None = None) -> tuple[RowAdamW, Any]:
    """``RowAdamW`` (betas 0.9, 0.98) over ``param_groups`` (default: every parameter with
    ``cfg.weight_decay``) and its warm-up + cosine schedule over ``cfg.epochs`` epochs.

    AdamW runs fused (one kernel pass over each parameter, on the CPU as on CUDA): it updates
    every row of the item tables every step, 8.55M parameters at 100,000 items: 44 ms per step
    with the per-tensor loop against 6 ms fused on one CPU thread (docs/benchmarks.md); with
    ``cfg.table_updates = "rows"`` the tables' gradients come sparse and only their rows read
    are updated (the others' share deferred, ``RowAdamW``)."""
    groups = param_groups or [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    optimizer = RowAdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), fused=True)
    total_steps = max(1, cfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, total_steps))
    return optimizer, scheduler


class RowAdamW(torch.optim.AdamW):
    """AdamW; a parameter whose gradient is sparse ((R, ...) rows, coalesced: ``TableGradients``
    with ``dense=False``) gets AdamW's update on the rows it holds alone, the other rows' share
    deferred until a step reads them again (or ``catch_up``) and then applied in closed form.

    For a row r in the gradient at the parameter's step t (counted over the steps that gave it a
    gradient), AdamW's update:

        m_r <- b1 m_r + (1 - b1) g_r
        v_r <- b2 v_r + (1 - b2) g_r^2
        w_r <- w_r a_t - lr_t / (1 - b1^t) * m_r / (sqrt(v_r / (1 - b2^t)) + eps),   a_t = 1 - lr_t wd

    A row last updated at step s and read again at t missed steps n = s+1 .. t-1, in which AdamW,
    its gradient zero, decays its moments (m <- b1 m, v <- b2 v) and keeps moving it by them:

        w_r <- w_r a_n - c_n q^(n-s) m_r(s) / (sqrt(v_r(s)) + eps),   c_n = lr_n sqrt(1 - b2^n) / (1 - b1^n),
                                                                       q = b1 / sqrt(b2)

    (eps stands where AdamW has eps sqrt(1 - b2^n) / b2^((n-s)/2), next to sqrt(v) a difference
    of float rounding). Those k = t-1-s steps come to

        w_r <- w_r A(s, t-1) - P_r m_r(s) / (sqrt(v_r(s)) + eps),   P_r = sum_n c_n q^(n-s) A(n, t-1),
        m_r <- b1^k m_r,  v_r <- b2^k v_r,                           A(i, j) = a_(i+1) ... a_j

    applied before the step's own update of the row, so its weights and moments after step t
    are AdamW's. P depends on the row only through s, so the optimiser keeps P(s, t) for every
    step s it took, brought forward each step over the last H steps (P(s, t) = P(s, t-1) a_t +
    c_t q^(t-s), an (H,) update) and afterwards by A alone, its later terms being under
    q^H = 1e-7 of its first (H = 170 at betas 0.9, 0.98); with the running sum of log a_n
    (4 bytes a step each) and each row's last step (8 bytes a row), a row's catch-up is a
    gather and a few (n, ...) operations. What differs from AdamW is what a forward reads: a
    row not read for a while waits at its last update where AdamW would have moved it already;
    ``fit`` calls ``catch_up`` after every epoch, so validations and checkpoints see AdamW's
    weights. A step under a sampled softmax reads a few thousand of the catalogue's rows, and
    AdamW reads and writes all of them: the point.
    The moments live in AdamW's own state (``exp_avg``, ``exp_avg_sq``, ``step``), so
    checkpoints read either way. Dense gradients get torch's (fused) AdamW unchanged.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        rows_of: list[tuple[dict[str, Any], nn.Parameter, torch.Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    rows_of.append((group, p, p.grad))
                    p.grad = None  # AdamW skips a parameter without a gradient
        loss = super().step(closure)
        for group, p, grad in rows_of:
            self._update_rows(group, p, grad)
            p.grad = grad
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts every state tensor but `step` to its parameter's
            if "row_step" in state:        # dtype: float32 holds step counts exactly up to 2^24
                state["row_step"] = state["row_step"].to(torch.int64)

    @torch.no_grad()
    def catch_up(self, chunk_rows: int = 65_536) -> None:
        """Give every row of the row-wise updated parameters the steps it missed since its last
        update: the weights and moments AdamW would hold now (in place, ``chunk_rows`` rows at a
        time)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if "row_step" in state:
                    now = int(state["step"])
                    for start in range(0, p.shape[0], chunk_rows):
                        part = slice(start, start + chunk_rows)
                        self._catch_up(group, state, p.data[part], state["exp_avg"][part],
                                       state["exp_avg_sq"][part], state["row_step"][part], now)
                    state["row_step"].fill_(now)

    def _update_rows(self, group: dict[str, Any], p: nn.Parameter, grad: torch.Tensor) -> None:
        state = self.state[p]
        if not state:  # AdamW's layout (a float32 step on the parameter's device, as fused AdamW keeps it)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "row_step" not in state:  # the row-wise bookkeeping, also after AdamW's own state
            state["row_step"] = torch.full((p.shape[0],), int(state["step"]), dtype=torch.int64, device=p.device)
            state["pulls"] = torch.zeros(64, dtype=p.dtype, device=p.device)  # P(s, now) at s
            state["log_decay"] = torch.zeros(64, dtype=p.dtype, device=p.device)  # sum_(n<=t) log a_n at t
        state["step"] += 1
        t = int(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, decay = float(group["lr"]), group["eps"], group["weight_decay"]
        rows, g = grad.indices()[0].contiguous(), grad.values()  # (n,) distinct rows, (n, ...) their gradient
        w, m, v = (x.index_select(0, rows) for x in (p.data, state["exp_avg"], state["exp_avg_sq"]))  # (n, ...)
        self._catch_up(group, state, w, m, v, state["row_step"].index_select(0, rows), t - 1)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        w.mul_(1 - lr * decay).addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        for target, rows_now in ((p.data, w), (state["exp_avg"], m), (state["exp_avg_sq"], v)):
            target.index_copy_(0, rows, rows_now)
        state["row_step"].index_fill_(0, rows, t)
        self._record_step(state, group, t, lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t), math.log1p(-lr * decay))

    @staticmethod
    def _horizon(group: dict[str, Any]) -> tuple[float, int]:
        """(q, H): q = b1 / sqrt(b2) and the steps H after which q^H < 1e-7."""
        beta1, beta2 = group["betas"]
        q = beta1 / math.sqrt(beta2)
        if q >= 1:
            raise ValueError(f"row-wise AdamW needs beta1 < sqrt(beta2), got betas {group['betas']}")
        return q, math.ceil(math.log(1e-7) / math.log(q))

    def _record_step(self, state: dict[str, Any], group: dict[str, Any], t: int, rate: float, log_decay: float) -> None:
        """Step t's c_t (``rate``) and log a_t: the running sum at index t, and P(s, t) for the
        last H steps s (the buffers double when full)."""
        if t >= state["pulls"].numel():
            for key in ("pulls", "log_decay"):
                grown = torch.zeros(2 * t, dtype=state[key].dtype, device=state[key].device)
                grown[: state[key].numel()] = state[key]
                state[key] = grown
        state["log_decay"][t] = state["log_decay"][t - 1] + log_decay
        q, horizon = self._horizon(group)
        start = max(0, t - horizon)
        ahead = torch.arange(t - start, 0, -1, device=state["pulls"].device, dtype=state["pulls"].dtype)  # (t-start,) t - s
        window = state["pulls"][start:t]  # (t-start,) P(s, t-1) for s = start .. t-1
        window.mul_(math.exp(log_decay)).add_(rate * q ** ahead)

    def _catch_up(self, group: dict[str, Any], state: dict[str, Any], w: torch.Tensor, m: torch.Tensor,
                  v: torch.Tensor, last: torch.Tensor, now: int) -> None:
        """Give rows (weights ``w``, moments ``m`` and ``v``, each (n, ...), changed in place) last
        updated at steps ``last`` (n,) the steps from then to ``now`` (the closed form in the
        class docstring; a row already at ``now`` is left as it is)."""
        beta1, beta2 = group["betas"]
        _, horizon = self._horizon(group)
        log_decay = state["log_decay"]
        pull = state["pulls"][last] * torch.exp(log_decay[now] - log_decay[(last + horizon).clamp_(max=now)])  # (n,) P(s, now)
        shape = (-1,) + (1,) * (w.dim() - 1)  # broadcast a per-row scalar over the row's other dims
        w.mul_(torch.exp(log_decay[now] - log_decay[last]).view(shape))
        w.sub_(pull.view(shape) * m / (v.sqrt() + group["eps"]))
        missed = (now - last).to(w.dtype).view(shape)  # k
        m.mul_(beta1 ** missed)
        v.mul_(beta2 ** missed)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so that their joint L2 norm is at most ``max_norm``; returns
    the norm before. Sparse gradients (coalesced, ``TableGradients`` with ``dense=False``) count
    their rows' values, as their dense form would."""
    params = [p for p in parameters if p.grad is not None]
    sparse = [p.grad.values() for p in params if p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    dense = [p for p in params if not p.grad.is_sparse]
    norms = [torch.linalg.vector_norm(values) for values in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in dense]))
    total = torch.linalg.vector_norm(torch.stack(norms))
    if dense:
        torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as clip_grads_with_norm_ scales
    for values in sparse:
        values.mul_(scale)
    return total


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0.1 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
