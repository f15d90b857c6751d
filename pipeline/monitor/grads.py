"""Gradient norms per parameter group: the model's top-level modules.

A global norm says *that* gradients explode or vanish; the group says *where* (for Diffold:
``trunk``, ``diffusion``, ``distogram``, ``confidence``). The norms stay tensors on the
device, so the caller can read them together with its other values in one host sync.
"""

from __future__ import annotations

import torch

#: Group of the trainable parameters that belong to the model itself, not to a child module.
ROOT_GROUP = "root"
#: torch >= 2.6: the norm of many tensors in a few fused kernels (clip_grad_norm_ uses it).
_total_norm = getattr(torch.nn.utils, "get_total_norm", None)


def module_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters by top-level child module, in registration order; parameters
    registered on ``model`` itself form the group ``"root"``. Children without trainable
    parameters are left out."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    own = [p for p in model.parameters(recurse=False) if p.requires_grad]
    if own:
        groups[ROOT_GROUP] = own
    for name, child in model.named_children():
        params = [p for p in child.parameters() if p.requires_grad]
        if params:
            groups[name] = params
    return groups


def grad_norms_by_group(
    groups: dict[str, list[torch.nn.Parameter]] | torch.nn.Module,
) -> dict[str, torch.Tensor]:
    """L2 norm of the current ``.grad`` of each group, as 0-dim float32 tensors on the
    parameters' device (no host sync). Parameters without a gradient count as zero; a group
    with none at all has norm 0. Pass a module to group it with :func:`module_groups`."""
    if isinstance(groups, torch.nn.Module):
        groups = module_groups(groups)
    norms = {}
    for name, params in groups.items():
        grads = [p.grad.detach() for p in params if p.grad is not None]
        if grads and _total_norm is not None:
            norms[name] = _total_norm(grads, norm_type=2.0).float()  # fused (foreach) kernels
        elif grads:
            per_param = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
            norms[name] = torch.linalg.vector_norm(torch.stack(per_param))
        else:
            norms[name] = torch.zeros((), dtype=torch.float32, device=params[0].device)
    return norms
