"""The little pkdpipe needs from torch.distributed: who am I, how many are we, wait for the others.

Under `torchrun` (WORLD_SIZE > 1 in the environment) the process group is started on first use,
with nccl when the ranks compute on GPUs and gloo otherwise (`choose_backend`). In a plain process
every helper answers as the only rank, so library code calls them unconditionally.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist

from pkdpipe.errors import PkdError

T = TypeVar("T")


def launched_distributed() -> bool:
    """True inside a torchrun process with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def choose_backend(device: str = "auto") -> str:
    """nccl when the ranks will compute on GPUs (`device` auto or cuda, a GPU visible, torch built
    with nccl); gloo otherwise, which is what CPU ranks need (nccl cannot reduce CPU tensors)."""
    if device != "cpu" and torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init(device: str = "auto") -> None:
    """Start the process group if torchrun launched us and nobody has started it yet.

    `device` is the stage's --device: with `cpu` the group uses gloo even on a GPU machine."""
    if not launched_distributed() or dist.is_initialized():
        return
    backend = choose_backend(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
    # Destroy the group while the interpreter is still whole: a gloo group left to interpreter
    # shutdown can abort a rank after all its work is done (SIGABRT, "terminate called without an
    # active exception"; see pytorch/pytorch#179291), and torchrun then fails the whole job.
    atexit.register(shutdown)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def node_rank_and_size() -> tuple[int, int]:
    """This rank's place among the ranks of its own machine (torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE); (0, 1) in one process."""
    if not dist.is_initialized():
        return 0, 1
    return int(os.environ.get("LOCAL_RANK", rank())), int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    """Where a tensor must live for a collective: the rank's GPU under nccl, the CPU under gloo."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def all_ok(ok: bool) -> bool:
    """True when `ok` holds on every rank, so that all ranks agree to stop together."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks; every rank must call this at the same point, with the
    same keys. Used for the training log, so that it reports the whole global batch, not rank 0's part."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    totals = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(totals)
    means = dict(zip(keys, (totals / dist.get_world_size()).tolist()))
    return {k: means[k] for k in values}  # in the caller's order


def broadcast_object(obj):
    """Rank 0's `obj`, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(action: Callable[[], T], main_only: bool = False) -> T | None:
    """Run `action` on every rank (or on rank 0 alone) and raise its PkdError on every rank if it
    failed on any: no rank is left waiting in a collective for one that stopped. Also a barrier.
    Returns the action's result (None on the ranks that did not run it)."""
    failure, result = None, None
    if not main_only or is_main():
        try:
            result = action()
        except PkdError as err:
            failure = err
    if not dist.is_initialized():
        if failure is not None:
            raise failure
        return result
    if all_ok(failure is None):
        return result
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if failure is None else (type(failure), str(failure)))
    kind, message = next(m for m in messages if m is not None)
    raise kind(message)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank's process once its command is done, without C++ teardown.

    Even after `destroy_process_group`, a gloo rank can abort during interpreter finalization
    ("terminate called without an active exception", SIGABRT, no Python frame left) when its peer
    tears down at the same moment, and torchrun then fails a job whose work was all done: seen once
    in CI and in 2 of 44 two-rank finetunes on a loaded 2-core machine (0 of 40 since this exit).
    So after success the ranks wait for each other and destroy the group; then (after a failure too:
    a group torn down while a peer may still be in a collective can hang) they flush their output
    and leave with `os._exit`. Every file was written and closed by the command itself, so
    finalization has nothing left to do."""
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
