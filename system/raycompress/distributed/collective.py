"""Statistics reduction over Ray's collective communication: NCCL between GPU actors (the tensors
never leave the GPUs), gloo (torch.distributed) between CPU actors. The alternative transport to
the object-store tree of `engine.pipeline.reduce_to`; the layer pipeline does not know which runs.

Every actor calls `collective_reduce` for the same keys in the same order (the driver submits the
calls to all actors together), a collective `reduce` sums each key's buffer onto the owner, and
the other actors free theirs. Token counts and output norms travel in a small float64 tensor.
Source: `ray.util.collective` (create_collective_group, reduce); NCCL's reduce is a pipelined
ring, each rank sending about one buffer, i.e. (K − 1) buffers in all, the analytic minimum.
"""
from __future__ import annotations

import torch


def choose_transport(setting: str, devices: list[str]) -> str:
    """"object_store", "nccl" or "gloo" for the RayConfig.collective setting and the actors' devices.

    Raises:
        ValueError: "nccl" asked for actors that are not all on CUDA devices.
    """
    on_gpu = bool(devices) and all(d.startswith("cuda") for d in devices)
    if setting == "auto":
        return "nccl" if on_gpu and len(devices) > 1 else "object_store"
    if setting == "nccl" and not on_gpu:
        raise ValueError(f"ray.collective: nccl needs every compression actor on a GPU; devices are {devices}")
    return setting


def create_group(actors: list, backend: str, name: str) -> None:
    from ray.util import collective as col

    # a reduce waits for the slowest actor's statistics pass: minutes at 70B widths, not gloo's 30 s default
    col.create_collective_group(actors, len(actors), list(range(len(actors))), backend=backend, group_name=name,
                                gloo_timeout=3_600_000)


def collective_reduce(worker, keys: list[str], names: list[str], owner: int, world: int, group: str) -> None:
    """Sum `worker.stats[key]` over all ranks onto rank `owner` (in place there; freed elsewhere);
    max instead of sum for the kinds `engine.stats.MAX_KINDS` reduces with max (absmax).

    Args:
        worker: an `engine.worker.LayerWorker` (its `stats`, `rank`, `device`).
        names: the linears whose output norms the keys carry.
        world: number of ranks; the owner counts (world − 1) buffers as received (the transport's
            own traffic is not observed).
    """
    from ray.util import collective as col
    from ray.util.collective.types import ReduceOp

    from raycompress.engine.stats import MAX_KINDS

    for key in keys:
        st = worker.stats[key]
        buf = st._buffer()  # a rank that saw no rows of a subset still contributes zeros
        meta = torch.tensor([float(st.tokens)] + [st.out_sq.get(n, 0.0) for n in names],
                            dtype=torch.float64, device=buf.device)
        col.reduce(buf, dst_rank=owner, group_name=group, op=ReduceOp.MAX if st.kind in MAX_KINDS else ReduceOp.SUM)
        col.reduce(meta, dst_rank=owner, group_name=group)
        if worker.rank != owner:
            del worker.stats[key]
            continue
        worker._count_in((world - 1) * st.nbytes)
        st.tokens = int(meta[0])
        st.out_sq = {n: float(v) for n, v in zip(names, meta[1:].tolist())}
