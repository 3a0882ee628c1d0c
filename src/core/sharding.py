"""Fully sharded data parallel (PyTorch's FSDP2, `fully_shard`) for models one device cannot hold.

Every process keeps 1/N of each wrapped module's weights, gradients and Adam moments (DTensors sharded on
their first dimension) and gathers a module's full weights only while it runs. A model is wrapped by
size, as FSDP's size-based policy does: bottom-up, each submodule holding at least `min_params` weights
not yet wrapped becomes its own shard unit, then the root takes the rest.

accelerate's FSDP plugin selects the same `fully_shard` on GPUs only; calling it directly keeps one code
path for CPU processes over gloo (the tests) and GPUs over NCCL.

Checkpoints are sharded: each process writes its own shards with torch.distributed.checkpoint (DCP) into
one folder, loaded back in place on the same number of processes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every process calls it), a plain tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def shard_by_size(model: torch.nn.Module, min_params: int) -> list[str]:
    """fully_shard `model`'s submodules bottom-up by size, then the root; returns the wrapped submodules' names.

    A submodule becomes a unit when the weights under it that no smaller unit took reach `min_params`
    (a ModuleList or ModuleDict, which has no forward, passes them up to its parent)."""
    from torch.distributed.fsdp import fully_shard

    wrapped: list[str] = []

    def visit(name: str, module: torch.nn.Module) -> int:
        """Weights under `module` not yet in a unit (its own and its children's leftovers)."""
        left = sum(visit(f"{name}.{child}" if name else child, m) for child, m in module.named_children())
        left += sum(p.numel() for p in module.parameters(recurse=False))
        container = isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict))   # no forward of its own
        if module is not model and not container and left >= min_params:
            fully_shard(module)
            wrapped.append(name)
            return 0
        return left

    visit("", model)
    fully_shard(model)
    return wrapped


def save_sharded(state: dict, folder: Path) -> None:
    """Every process writes its shards of `state` (model / optimizer state dicts, tensors) into `folder`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(state: dict, folder: Path) -> None:
    """Fill `state`'s tensors in place from the shards in `folder` (written by as many processes)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(folder))


def move_files(source: Path, target: Path) -> None:
    """The files of `source` (DCP's shards and .metadata) into `target`, then `source` removed."""
    for path in source.iterdir():
        shutil.move(str(path), str(target / path.name))
    shutil.rmtree(source, ignore_errors=True)
