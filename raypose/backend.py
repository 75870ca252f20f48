"""PyTorch process groups for Ray Train, set up without importing torch outside the workers.

Ray's `TorchConfig` (ray/train/torch/config.py) imports torch at module level, and Ray Train's
controller unpickles the backend config it is given, so with `TorchTrainer` every run's controller
(a process that never trains) and every sweep trial's driver spent seconds importing torch before a
worker started. `TorchBackendConfig` does what Ray 2.60's `_TorchBackend.on_start` does, driven from
the controller, while every function that touches torch runs on the workers:

  1. rank 0's address and a free port, set as MASTER_ADDR / MASTER_PORT on every worker,
  2. LOCAL_RANK, RANK, WORLD_SIZE and friends on every worker (torch.distributed's env:// names),
  3. init_process_group on every worker at once: nccl when the workers have GPUs, gloo otherwise,
and, at the end, the process group's teardown. Each worker's CUDA device is set before the
training function runs (Ray's TorchConfigContextManager).

This module must not import torch (tests/test_backend.py checks it in a fresh process).
"""

import os
import threading
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig

SHUTDOWN_TIMEOUT_S = 30  # Ray's DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S


# ----------------------------------------------------------------------------------------------
# Run on the workers (pickled by reference to this module; torch is imported there)


def _address_and_port() -> tuple:
    from ray.train._internal.utils import get_address_and_port

    return get_address_and_port()


def _warm_up() -> None:
    """torch's first optimiser imports torch._dynamo (about 900 modules, 2 s on one core here):
    done once, in the background, while the process group forms and the training function is
    sent, instead of in front of the first step."""
    import torch

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def _prepare_worker(addr: str, port: int) -> None:
    """rank 0's address for env:// initialisation, and the warm-up started in the background."""
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)
    threading.Thread(target=_warm_up, name="raypose-warm-up", daemon=True).start()


def _torch_config_call(name: str, **kwargs):
    """One of Ray's worker-side helpers in ray.train.torch.config, imported on the worker."""
    from ray.train.torch import config

    return getattr(config, name)(**kwargs)


class CudaDevice:
    """The training function's context on each worker: its GPU (if any) is the current device."""

    def __enter__(self):
        import torch

        if torch.cuda.is_available():
            import ray.train.torch

            device = ray.train.torch.get_device()
            if device.type == "cuda":
                torch.cuda.set_device(device)

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------------------
# Run in Ray Train's controller


class _TorchBackend(Backend):
    def on_start(self, worker_group, backend_config: "TorchBackendConfig") -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        addr, port = worker_group.execute_single(0, _address_and_port)
        worker_group.execute(_prepare_worker, addr, port)
        worker_group.execute(_torch_config_call, "_set_torch_distributed_env_vars")
        size = len(worker_group)
        ray.get([worker_group.execute_single_async(
            rank, _torch_config_call, "_setup_torch_process_group", backend=backend,
            world_rank=rank, world_size=size, init_method="env://",
            timeout_s=backend_config.timeout_s) for rank in range(size)])

    def on_shutdown(self, worker_group, backend_config: "TorchBackendConfig") -> None:
        futures = worker_group.execute_async(_torch_config_call, "_shutdown_torch",
                                             destroy_process_group=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            pass  # as Ray's: a worker that does not answer is torn down with its actor anyway


@dataclass
class TorchBackendConfig(BackendConfig):
    """Stands in for ray.train.torch.TorchConfig (same fields, env:// initialisation only)."""

    backend: str | None = None  # None: nccl with GPUs, gloo without
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _TorchBackend

    @property
    def train_func_context(self):
        return CudaDevice

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework  # Ray: what the dashboard shows

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}
