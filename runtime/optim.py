"""cuda-convnet's learning rule, exactly, as a torch optimizer.

For each parameter W with its layer's rule (epsW/epsB, momW/momB, wc):

    inc = mom * inc - eps(progress) * lr_scale * (grad + wc * W)
    W  += inc

``grad`` is the minibatch-mean gradient.  The momentum buffer holds
eps-scaled increments, so this differs from ``torch.optim.SGD`` (which keeps
raw gradients and scales by the current rate) as soon as eps changes: a
schedule step or a learning-rate drop.  ``eps`` is a cuda-convnet2 schedule
over training progress in [0, 1]; ``lr_scale`` is the global factor that drops
and the plateau rule apply.  A parameter whose schedule's base is 0 is frozen,
as in cuda-convnet.  ``wball`` > 0 rescales each filter of a conv or fc layer
to that L2 norm after the update (cuda-convnet2's weight constraint).

A layer with ``updatePeriod=N`` accumulates its gradients over N minibatches
and updates on every N-th call of :meth:`ConvnetSGD.step` with their mean;
the optimizer clears exactly the gradients it used (call
:meth:`ConvnetSGD.zero_grad` only to drop everything).  It consumes them: the
mean and the weight decay are computed in place in ``p.grad``.

Parameters sharing one (eps, mom, wc) rule are updated together, one group at
a time, not one tensor at a time.  On CPU and CUDA a group is updated by one
pass scaling the gradients and PyTorch's fused SGD kernel (``torch._fused_sgd_``,
what ``torch.optim.SGD(fused=True)`` runs), which reads W, grad and inc once and
writes W and inc once: seven reads and writes of each element against eleven for
the four ``torch._foreach_*`` passes.  On AlexNet's 61 million parameters the step
took 41-45 ms against 62-64 ms (``bench/optim_step.py``, 2-core CPU).  The foreach
passes remain for a zero momentum and wherever the kernel is not right (see
``_fusable``: other devices, bf16/fp16 weights, mixed layouts).
"""

from __future__ import annotations

from collections import defaultdict

import torch


# torch._fused_sgd_ is taken only where it is right: float32 and float64 (on the CPU of
# torch 2.13 it leaves bf16 and fp16 weights unchanged in whole 16-element chunks), tensors
# of one layout (a channels_last weight with a contiguous buffer came out wrong), and a
# device type whose kernel a first tiny call found (the CPU kernel came with torch 2.4;
# the pin here allows 2.1).
_FUSED_DTYPES = (torch.float32, torch.float64)
_fused_kernel: dict[str, bool] = {}


def _has_fused_kernel(device: torch.device) -> bool:
    if device.type not in _fused_kernel:
        try:
            one = [torch.zeros(1, device=device)]
            torch._fused_sgd_(one, [torch.zeros(1, device=device)], [torch.zeros(1, device=device)],
                              weight_decay=0.0, momentum=0.9, lr=1.0, dampening=0.0, nesterov=False,
                              maximize=False, is_first_step=False)
            _fused_kernel[device.type] = device.type in ("cpu", "cuda")
        except (AttributeError, NotImplementedError, RuntimeError, TypeError):
            # TypeError: a torch whose private kernel takes other arguments than 2.13's.
            _fused_kernel[device.type] = False
    return _fused_kernel[device.type]


def _fusable(params: list[torch.Tensor], incs: list[torch.Tensor], dtype: torch.dtype,
             device: torch.device) -> bool:
    return (dtype in _FUSED_DTYPES and _has_fused_kernel(device)
            and all(p.stride() == p.grad.stride() == inc.stride() for p, inc in zip(params, incs)))


class ConvnetSGD(torch.optim.Optimizer):
    def __init__(self, rules, fused: bool | None = None):
        """``rules``: (name, parameter, convspec.builder.Rule) triples, as
        ``CompiledNet.learning_rules()`` yields them.  ``fused``: None uses the
        fused kernel where there is one; False always takes the foreach passes
        (the two give the same update up to rounding, tested)."""
        params, self.rules, self.names = [], {}, {}
        for name, param, rule in rules:
            if rule.eps is None or rule.mom is None:
                raise ValueError(f"parameter '{name}' has no learning rate or momentum: "
                                 "set epsW/epsB and momW/momB in the params file")
            params.append(param)
            self.rules[id(param)] = rule
            self.names[id(param)] = name
        super().__init__(params, {})
        self.progress = 0.0
        self.lr_scale = 1.0
        self.batches = 0  # step() calls so far: which layers' updatePeriod is due
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.batches += 1
        groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        due = []
        for group in self.param_groups:
            for p in group["params"]:
                rule = self.rules[id(p)]
                period = max(1, rule.update_period)
                if p.grad is None or self.batches % period:
                    continue
                due.append(p)
                if period > 1:
                    p.grad.div_(period)  # the summed gradients' mean
                if rule.eps.base <= 0:
                    continue
                eps = rule.eps.value(self.progress) * self.lr_scale
                state = self.state[p]
                if "inc" not in state:
                    state["inc"] = torch.zeros_like(p)
                groups[(eps, rule.mom, rule.wc, p.device, p.dtype)].append(p)
        for (eps, mom, wc, device, dtype), params in groups.items():
            grads = [p.grad for p in params]
            incs = [self.state[p]["inc"] for p in params]
            if mom and self.fused is not False and _fusable(params, incs, dtype, device):
                # torch's fused rule is  buf = mom * buf + (g + wd * W);  W -= lr * buf.
                # With g pre-scaled by -eps, wd = -eps * wc and lr = -1 it is exactly
                # cuda-convnet's  inc = mom * inc - eps * (grad + wc * W);  W += inc,
                # with inc kept as the buffer.  (is_first_step=False: inc starts at zero,
                # which the rule then multiplies by mom, as cuda-convnet does.)
                torch._foreach_mul_(grads, -eps)
                torch._fused_sgd_(params, grads, incs, weight_decay=-eps * wc, momentum=mom,
                                  lr=-1.0, dampening=0.0, nesterov=False, maximize=False,
                                  is_first_step=False)
                continue
            if wc:
                # grad + wc * W, in place: the gradients are used once, here (step() clears them),
                # and a fresh copy of AlexNet's was 240 MB to allocate and fault in every step.
                torch._foreach_add_(grads, params, alpha=wc)
            torch._foreach_mul_(incs, mom)
            torch._foreach_add_(incs, grads, alpha=-eps)
            torch._foreach_add_(params, incs)
        for p in due:
            rule = self.rules[id(p)]
            if rule.wball > 0 and p.dim() >= 2 and rule.eps.base > 0:
                self._constrain(p, rule)
            p.grad = None  # used: the next minibatches accumulate afresh
        return loss

    @staticmethod
    def _constrain(p: torch.Tensor, rule) -> None:
        """cuda-convnet2's wball: conv and fc filters are rescaled to norm
        wball; local filters (one per location and filter) only when above it."""
        if rule.layer_type == "local":
            norms = p.flatten(2).norm(dim=2, keepdim=True).clamp_min(1e-12)  # (L, F, 1)
            scale = (rule.wball / norms).clamp(max=1.0)
            p.mul_(scale.view(*scale.shape[:2], *([1] * (p.dim() - 2))))
        else:
            norms = p.flatten(1).norm(dim=1).clamp_min(1e-12)  # one filter per output unit
            p.mul_((rule.wball / norms).view(-1, *([1] * (p.dim() - 1))))

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self):
        state = super().state_dict()
        state["progress"], state["lr_scale"], state["batches"] = self.progress, self.lr_scale, self.batches
        # Between step() calls the only gradients left are those an updatePeriod > 1 is still
        # summing: a checkpoint without them resumed from a fresh sum and went elsewhere.
        state["pending_grads"] = [None if p.grad is None else p.grad.detach().clone() for p in self._params()]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.progress = state_dict.pop("progress", 0.0)
        self.lr_scale = state_dict.pop("lr_scale", 1.0)
        self.batches = state_dict.pop("batches", 0)
        pending = state_dict.pop("pending_grads", None)  # None: a checkpoint from before they were kept
        super().load_state_dict(state_dict)
        if pending is not None:
            for p, grad in zip(self._params(), pending, strict=True):
                p.grad = None if grad is None else torch.empty_like(p).copy_(grad)
