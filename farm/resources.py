"""Resource requests per variant: what Ray reserves for a worker.

Host memory is estimated from the checkpoint size when the spec does not set it: the model in fp32 plus a
copy for saving/compression, plus calibration activations. Estimates are deliberately simple and
conservative; the benchmark (bench/) is where they are checked against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Resources:
    num_gpus: float
    num_cpus: float
    memory_bytes: int
    ranks: int = 1  # >1: a placement group of `ranks` workers of this shape (data-parallel calibration)
    gpu_memory_bytes: int = 0  # a cap on the GPU memory the variant may use (0: its share of the GPU)
    gptq_hessian: str = "tensor_cores"  # how GPTQ Hessians are summed on a GPU (stages/llmc/hessian_tensor_cores.py)
    gptq_inverse: str = (
        "left_looking"  # how GPTQ uses H^-1 (stages/llmc/gptq_left_looking.py, stages/llmc/gptq_one_cholesky.py)
    )
    calibration_attention: str = "sdpa"  # attention in calibration passes (stages/llmc/calibration_sdpa.py)
    gptq_broadcast: str = (
        "llmcompressor"  # how DDP ranks get each layer's GPTQ results (stages/llmc/ddp_forward_order.py)
    )

    def ray_options(self) -> dict[str, float | int]:
        return {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus, "memory": self.memory_bytes}


def estimate_host_bytes(weights_bytes: int, num_samples: int, seq_len: int, hidden_size: int) -> int:
    """fp32 weights twice (model + compressed copy while saving) + one layer's activations for every sample
    (sequential calibration keeps them on the host) + 1 GiB for the runtime."""
    activations = num_samples * seq_len * max(hidden_size, 1) * 4 * 4
    return int(2 * weights_bytes + activations + GIB)


def request(
    num_gpus: float,
    num_cpus: float,
    memory_gb: float | None,
    weights_bytes: int,
    num_samples: int,
    seq_len: int,
    hidden_size: int,
) -> Resources:
    if memory_gb:
        return Resources(num_gpus=num_gpus, num_cpus=num_cpus, memory_bytes=int(memory_gb * GIB))
    memory = estimate_host_bytes(weights_bytes, num_samples, seq_len, hidden_size)
    return Resources(num_gpus=num_gpus, num_cpus=num_cpus, memory_bytes=memory)


def pool_size(totals: dict[str, float], num_cpus: float, num_gpus: float, memory_bytes: int, tasks: int) -> int:
    """How many workers of this shape the cluster holds at once (at least 1, at most one per task).
    Fractional `num_gpus` packs several workers on one GPU."""
    fits = [totals.get("CPU", 1) / num_cpus]
    if num_gpus > 0:
        fits.append(totals.get("GPU", 0) / num_gpus)
    if memory_bytes > 0 and totals.get("memory"):
        fits.append(totals["memory"] / memory_bytes)
    return max(1, min(tasks, int(min(fits) + 1e-9)))


def unfit(nodes: list[dict[str, float]], num_cpus: float, num_gpus: float, memory_bytes: int) -> str | None:
    """Why no node can hold one worker of this shape, or None when some node can. Ray would otherwise queue
    such a worker forever."""
    if not nodes:
        return "the Ray cluster has no live nodes"
    for node in nodes:
        if (
            node.get("CPU", 0) >= num_cpus
            and node.get("GPU", 0) >= num_gpus
            and (not memory_bytes or node.get("memory", 0) >= memory_bytes)
        ):
            return None
    most = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0), n.get("memory", 0)))
    return (
        f"resources: a variant needs {num_cpus:g} CPU, {num_gpus:g} GPU, {memory_bytes / GIB:.1f} GiB but the "
        f"largest node has {most.get('CPU', 0):g} CPU, {most.get('GPU', 0):g} GPU, "
        f"{most.get('memory', 0) / GIB:.1f} GiB"
    )
