"""One place that decides how training is spread over devices: `trainer.strategy`.

- `auto`: Lightning's choice (one device).
- `ddp`: `DDPStrategy`; every rank holds the whole student and teacher.
- `fsdp`: `ModelParallelStrategy` (PyTorch FSDP2, `fully_shard`), which also runs on CPU with
  gloo. `OPDModule.configure_model` calls `shard_model` for the student and the frozen teacher:
  every decoder layer (found from the model's `_no_split_modules`, or
  `trainer.fsdp_layer_classes`) becomes its own FSDP unit, then the root. On GPU with bf16
  precision the parameters are gathered in bf16 and gradients reduced in fp32;
  `trainer.activation_checkpointing` recomputes each decoder layer in the backward pass.

Under `fsdp` every forward pass is a collective, so all ranks must run the same number of them:
generation uses `synced_gpus=True` (ranks whose responses ended keep stepping until all have),
and tool rollouts also keep their turns in step (a finished rank joins the others' turns on a
dummy batch, rollout/tools.py).
"""

from __future__ import annotations

import torch

from lightning_opd.config import Config


def build_strategy(cfg: Config):
    name = cfg.trainer.strategy
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    if name == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else "auto"
        data_parallel = devices * cfg.trainer.num_nodes if devices != "auto" else "auto"
        return ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=1)
    raise ValueError(f"trainer.strategy={name!r} is not one of auto | ddp | fsdp")


def decoder_layer_classes(model: torch.nn.Module, names: list[str] | None = None) -> set[type]:
    """The classes of the model's decoder layers: `names`, else its `_no_split_modules`."""
    wanted = set(names or getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not found:
        raise ValueError(
            f"no decoder layer found in {type(model).__name__} (looked for {sorted(wanted) or 'nothing'}); "
            "set trainer.fsdp_layer_classes to the class name of its decoder layer"
        )
    return found


def mixed_precision_policy(cfg: Config, on_gpu: bool):
    """bf16 parameters with fp32 gradient reduction on GPU under bf16 precision, else None."""
    if not on_gpu or not cfg.trainer.precision.startswith("bf16"):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: torch.nn.Module, mesh, cfg: Config, *, on_gpu: bool) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root; optional activation checkpointing."""
    from torch.distributed.fsdp import fully_shard

    classes = tuple(decoder_layer_classes(model, list(cfg.trainer.fsdp_layer_classes or [])))
    if cfg.trainer.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
        )

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, classes))
    kwargs = {"mesh": mesh}
    policy = mixed_precision_policy(cfg, on_gpu)
    if policy is not None:
        kwargs["mp_policy"] = policy
    for module in list(model.modules()):
        if isinstance(module, classes):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model
