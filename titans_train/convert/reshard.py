"""Resuming a checkpoint on another layout: which route re-cuts it, and the ZeRO-0 route.

`resume_route` decides, from the checkpoint's manifest and this run's layout, how its state
reaches this run (`titans_train.train.checkpoint.CheckpointManager.load` takes the route):

  same             same tp size and ZeRO partitions (or ZeRO 0 on another dp size: it keeps no
                   partitioned state): DeepSpeed loads the checkpoint itself
  deepspeed        ZeRO 1-3, tp 1 on both sides, another number of ZeRO partitions: DeepSpeed's
                   `ds_to_universal`, loaded as a universal checkpoint
  tensor_parallel  ZeRO 1-3 with tp > 1 on either side: `universal.write_universal`, one universal
                   checkpoint cut for each new tp rank
  zero0            ZeRO 0 on another tp size: `write_zero0_for_tp`, a ZeRO-0 checkpoint of the new
                   tp size (module weights and Adam's moments joined over tp and cut again)

ZeRO 0 holds the whole optimizer state of a tp rank in its model-states file
(`mp_rank_XX_model_states.pt`: "module" and the torch AdamW "optimizer" state dict, whose
entries are numbered in parameter-group order). The parameters of the group lists are named by
the module's state dict order (`named_parameters` order: tied weights once) split by
`no_weight_decay`, as `train.engine.parameter_groups` builds them, and checked against the
moments' shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from titans_train.config.errors import InvalidValueError
from titans_train.convert.consolidate import TRAINER_PREFIX, _torch_load
from titans_train.convert.errors import ConversionError
from titans_train.convert.tp_layout import is_weight_entry, merge_tensor_parallel, shard_for_rank

ROUTES = ("same", "deepspeed", "tensor_parallel", "zero0")
ADAM_STATES = ("exp_avg", "exp_avg_sq")


def resume_route(manifest: dict[str, Any], zero_stage: int, tp: int, zero_partitions: int, precision: str,
                 checkpoint: Path) -> str:
    """The route (`ROUTES`) that resumes `manifest`'s checkpoint at this layout, or a one-line
    `InvalidValueError` where none does."""
    source_stage = int(manifest["zero_stage"])
    source_tp = int(manifest["config"]["parallel"]["tp"])
    source_partitions = int(manifest.get("zero_partitions", manifest.get("data_parallel_size")))
    if source_stage != zero_stage:
        raise InvalidValueError("parallel.zero_stage", f"{checkpoint} was written with ZeRO {source_stage}, this run "
                                f"has ZeRO {zero_stage}; relaunch with parallel.zero_stage={source_stage}, or start "
                                "a new run from its weights with train.init_from=<checkpoint> and another checkpoint.dir")
    if zero_stage == 0:
        if source_tp == tp:
            return "same"
        if manifest["config"].get("train", {}).get("precision", precision) == "bf16":
            # DeepSpeed's bf16 optimizer keeps the fp32 master weights in shards of its own, which
            # its ZeRO-0 loader reads only for the same layout
            raise InvalidValueError("parallel.tp", f"{checkpoint} (ZeRO 0, bf16, tp={source_tp}) cannot resume with "
                                    f"tp={tp}: DeepSpeed's bf16 optimizer state of ZeRO 0 is not re-cut for another "
                                    f"tp size; relaunch with parallel.tp={source_tp}, or start a new run from its "
                                    "weights with train.init_from=<checkpoint> and another checkpoint.dir")
        return "zero0"
    if source_tp > 1 or tp > 1:
        return "same" if (source_tp, source_partitions) == (tp, zero_partitions) else "tensor_parallel"
    return "same" if source_partitions == zero_partitions else "deepspeed"


def _named_groups(module_state: dict[str, Any], no_weight_decay) -> list[list[str]]:
    """Parameter names (no trainer prefix) of the decay and no-decay groups, in optimizer order."""
    names, storages = [], set()
    for name, value in module_state.items():
        if not (is_weight_entry(name) and isinstance(value, torch.Tensor)):
            continue
        storage = value.untyped_storage().data_ptr()
        if storage in storages:  # a tied weight: named_parameters lists it once
            continue
        storages.add(storage)
        names.append(name.removeprefix(TRAINER_PREFIX))
    decay = [name for name in names if not no_weight_decay(name, module_state[TRAINER_PREFIX + name])]
    no_decay = [name for name in names if no_weight_decay(name, module_state[TRAINER_PREFIX + name])]
    return [decay, no_decay] if no_decay else [decay]


def _source_states(file: Path, tied: bool, no_weight_decay) -> tuple[dict[str, dict[str, torch.Tensor]], Any, dict]:
    """One tp rank's ZeRO-0 file -> ({"fp32" | "exp_avg" | "exp_avg_sq": {name: shard}}, step, file)."""
    saved = _torch_load(file, mmap=True)
    module, optimizer = saved["module"], saved["optimizer"]
    groups = _named_groups(module, no_weight_decay)
    if [len(group["params"]) for group in optimizer["param_groups"]] != [len(names) for names in groups]:
        raise ConversionError(file, "its optimizer groups do not match its module's parameters",
                              "resume it with the layout that wrote it")
    states: dict[str, dict[str, torch.Tensor]] = {"fp32": {}, **{key: {} for key in ADAM_STATES}}
    steps = set()
    for group, names in zip(optimizer["param_groups"], groups):
        for index, name in zip(group["params"], names):
            weight, entry = module[TRAINER_PREFIX + name], optimizer["state"][index]
            if entry["exp_avg"].shape != weight.shape:
                raise ConversionError(file, f"the optimizer state of {name} has shape {tuple(entry['exp_avg'].shape)}, "
                                      f"the weight {tuple(weight.shape)}", "resume it with the layout that wrote it")
            states["fp32"][name] = weight
            for key in ADAM_STATES:
                states[key][name] = entry[key]
            steps.add(float(entry["step"]))
    if len(steps) != 1:
        raise ConversionError(file, f"its parameters have different Adam step counts {sorted(steps)}",
                              "resume it with the layout that wrote it")
    for key in states:
        if tied:
            states[key].pop("lm_head.weight", None)
    return states, optimizer["state"][0]["step"], saved


def write_zero0_for_tp(checkpoint: Path, manifest: dict[str, Any], out: Path, target_tp: int,
                       target_groups: list[list[str]], target_keys: list[str], no_weight_decay) -> None:
    """Write into `out` the ZeRO-0 checkpoint files of `checkpoint` for `target_tp` ranks.

    `target_groups`: the new engine's optimizer groups as parameter names (no trainer prefix), in
    order; `target_keys`: its module's state dict keys (with the prefix). Every tp rank of a
    layout has the same names, so rank 0's describe every rank.
    Peak memory: the source's model-states files (memory-mapped) and the full weights and moments.
    """
    config = manifest["config"]
    source_tp, vocab_size = int(config["parallel"]["tp"]), int(config["model"]["vocab_size"])
    tied = config["model"].get("tie_embeddings", True)
    per_rank = [_source_states(checkpoint / f"mp_rank_{rank:02d}_model_states.pt", tied, no_weight_decay)
                for rank in range(source_tp)]
    full = {key: merge_tensor_parallel([states[key] for states, _, _ in per_rank], vocab_size)
            for key in per_rank[0][0]}
    step, template = per_rank[0][1], per_rank[0][2]
    extra = {key: value for key, value in template["module"].items() if not is_weight_entry(key)}
    for rank in range(target_tp):
        shards = {key: shard_for_rank(values, vocab_size, target_tp, rank) for key, values in full.items()}
        weights = shards["fp32"]
        module = {}
        for key in target_keys:
            name = key.removeprefix(TRAINER_PREFIX)
            if not is_weight_entry(key):
                module[key] = extra.get(key)
            else:
                module[key] = weights["embedding.weight" if tied and name == "lm_head.weight" else name]
        state, param_groups, index = {}, [], 0
        for names, group in zip(target_groups, template["optimizer"]["param_groups"]):
            param_groups.append({**group, "params": list(range(index, index + len(names)))})
            for name in names:
                state[index] = {"step": step.clone(), **{key: shards[key][name] for key in ADAM_STATES}}
                index += 1
        saved = {**template, "module": module, "optimizer": {"state": state, "param_groups": param_groups},
                 "mp_world_size": target_tp}
        torch.save(saved, out / f"mp_rank_{rank:02d}_model_states.pt")
