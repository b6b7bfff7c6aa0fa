"""MoCo pieces (He et al. 2020): a momentum key network and a FIFO queue of keys with pseudo-labels."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def make_key_net(net: nn.Module) -> nn.Module:
    """A frozen copy of ``net`` that follows it by momentum updates."""
    key_net = copy.deepcopy(net)
    key_net.requires_grad_(False)
    return key_net


@torch.no_grad()
def momentum_update(key_net: nn.Module, net: nn.Module, momentum: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q; buffers (BatchNorm statistics) are copied."""
    for p_k, p_q in zip(key_net.parameters(), net.parameters()):
        p_k.mul_(momentum).add_(p_q.detach(), alpha=1.0 - momentum)
    for b_k, b_q in zip(key_net.buffers(), net.buffers()):
        b_k.copy_(b_q)


@torch.no_grad()
def copy_into_key_net(key_net: nn.Module, net: nn.Module) -> None:
    """theta_k <- theta_q (MoCo initialisation; Co-Reg's reference also does it at every epoch start)."""
    momentum_update(key_net, net, 0.0)


class KeyQueue(nn.Module):
    """FIFO queue of ``size`` keys (D-dim), each with an integer pseudo-label and a confident flag.

    Starts empty; :meth:`contents` returns only the filled slots, so a queue longer than the data
    set (or not yet full) never contributes placeholder keys. Everything lives in buffers, so the
    queue travels with ``state_dict``.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("confident", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor, labels: Tensor, confident: Tensor) -> None:
        """Overwrite the oldest entries, wrapping around; only the last ``size`` rows of a longer batch are kept."""
        keys, labels, confident = keys[-self.size :], labels[-self.size :], confident[-self.size :]
        n = keys.shape[0]
        ptr = int(self.ptr)
        slots = (ptr + torch.arange(n, device=self.keys.device)) % self.size
        self.keys[slots] = keys.detach().to(self.keys.dtype)
        self.labels[slots] = labels
        self.confident[slots] = confident
        self.ptr.fill_((ptr + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    @torch.no_grad()
    def clear(self) -> None:
        """Forget every key: the queue is empty again, as at construction."""
        self.ptr.zero_()
        self.filled.zero_()

    def contents(self) -> tuple[Tensor, Tensor, Tensor]:
        """(keys (M, D), labels (M,), confident (M,)) of the M filled slots."""
        m = int(self.filled)
        return self.keys[:m], self.labels[:m], self.confident[:m]
