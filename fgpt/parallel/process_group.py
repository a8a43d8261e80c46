"""Process-group plumbing shared by ddp, fsdp and custom-fsdp.

torchrun (`python -m torch.distributed.run`) sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; the strategies join that group through env:// — gloo on CPU,
NCCL on CUDA — and build an explicit 1-D device mesh over all ranks.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fgpt.errors import FgptError
from fgpt.parallel.base import Strategy
from fgpt.attention import check_window_kernel
from fgpt.recompute import check as recompute_mode

# A dead peer must end the job promptly; torchrun kills the survivors, and this bounds the
# wait of a collective whose peer vanished without torchrun noticing.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)

# torch 2.13 renamed these two (same semantics) and warns on the old names.
all_gather_into_tensor = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' where a GPU is available, else 'cpu'; a named device must exist."""
    if name not in DEVICES:
        raise FgptError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise FgptError("--device cuda: no CUDA device is available")
    return name


def pick_device(device: str) -> torch.device:
    """resolve_device, and on CUDA this rank's GPU (LOCAL_RANK), made the current device."""
    if resolve_device(device) == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def share_cpu_threads() -> None:
    """Split the cores between the ranks on this machine (torchrun defaults to 1 thread)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))


def join_process_group(strategy_name: str, device: torch.device) -> bool:
    """Join torchrun's group; True when this call created it (and so must destroy it)."""
    if dist.is_initialized():
        return False
    if not launched_by_torchrun():
        raise FgptError(f"strategy {strategy_name!r} runs under torchrun: use nproc=N "
                        "(or `python -m torch.distributed.run --nproc-per-node N -m run.train ...`)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    device_id = device if device.type == "cuda" else None
    store = restart_store()
    if store is None:
        dist.init_process_group(backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT, device_id=device_id)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=COLLECTIVE_TIMEOUT,
                                device_id=device_id)
    return True


def restart_store() -> dist.Store | None:
    """The store for a group that torchrun restarted (--max-restarts); None on a first attempt.

    torchrun lends its rendezvous TCPStore to the workers and keeps it across restarts, so
    a restarted group would read the dead group's addresses ("Gloo connectFullMesh failed
    ... Connection refused"; pytorch issue #135712). Keys under a per-attempt prefix keep
    the attempts apart. Only one node's agent counts its restarts, so across nodes the
    count can disagree (a node that counts 0 would reuse the dead group's keys and wait
    for peers that never come): there, torchrun must give each attempt a fresh store, and
    a job that may restart is refused at its first attempt, on every node alike, rather
    than hanging at its first restart (tests/test_multinode.py).
    """
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    several_nodes = os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE")
    if shared and several_nodes and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0:
        raise FgptError("automatic restarts across several nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                        "in torchrun's environment (a fresh rendezvous store per attempt)")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if attempt == 0 or not shared:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=COLLECTIVE_TIMEOUT)
    return dist.PrefixStore(f"fgpt/attempt-{attempt}", store)


class DistributedStrategy(Strategy):
    """The rank / world / device / mesh bookkeeping every multi-process strategy shares."""

    def __init__(self, device: str = "auto", recompute: str = "none", window_kernel: str = "band", **_):
        self.recompute = recompute_mode(recompute)  # --recompute: what each block recomputes
        self.window_kernel = check_window_kernel(window_kernel)  # --window-kernel: how windowed layers compute
        self.device = pick_device(device)
        self._owns_group = join_process_group(self.name, self.device)
        if self.device.type == "cpu":
            share_cpu_threads()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.mesh: DeviceMesh = init_device_mesh(self.device.type, (self.world_size,))

    def mean_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        # SUM then divide: AVG is not offered by every backend for every op.
        total = value.detach().to(self.device, torch.float32).clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return (total / self.world_size).cpu()

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


def exit_without_finalizers(code: int) -> None:
    """Leave a torchrun worker at once, after its process group is destroyed and its files
    are written. Gloo's worker threads can still hold work objects when the interpreter
    finalises, and destroying them then aborts the process ("terminate called without an
    active exception", SIGABRT; see pytorch PR #179291) -- seen here about one run in six
    with 3 ranks. torchrun would report that clean finish as a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

