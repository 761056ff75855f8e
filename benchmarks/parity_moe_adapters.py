"""MoE-Adapters beside the official JiazuoYu/MoE-Adapters4CL code, class-incremental part
(``benchmarks/parity.py --method moe_adapters``; moe-adapters.md section 9).

Two comparisons. The block: the official ``ResidualAttentionBlock`` of ``cil/clip/model.py``
built at the tiny width with one of the project's MoE blocks copied into it (LayerNorms,
attention, MLP, both experts, router and noise weights, the latter given random values so the
gates are not uniform), both seeded identically right before the block, the official one fed a
(L, B, D) view of a contiguous (B, L, D) tensor as its reshape needs; outputs and parameter
gradients compared in eval mode (noise drawn, no dropout) and in train mode (noise and dropout).
The run: the official ``cil/main.py`` as it is, with its own ``ClassIncremental``, train loop,
MoE blocks (built by its own ``clip.load`` from the project's tiny checkpoint), AdamW and
evaluation loop, on the project's scenario; per task both accuracies, the prediction agreement
and the gate statistics.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from parity_common import (
    LoaderFactory,
    ParityError,
    Patches,
    TaskSeries,
    accuracy,
    agreement,
    align_logit_scale,
    check_logit_scale,
    cpu_patches,
    fit_tiny_backbone,
    fmt,
    import_official,
    load_checked,
    official_blocks,
    our_logit_scale,
    task_series,
    to_official_layout,
)
from torch import nn

OFFICIAL_BOTTLENECK = 64


def adapter_names(n_experts: int) -> dict[str, str]:
    """The project's MoE block paths under the official names (``cil/clip/model.py``)."""
    names = {"router": "router_list.0", "noise": "w_noise_list.0"}
    for e in range(n_experts):
        names[f"experts.{e}.down"] = f"adaptmlp_list.{e}.down_proj"
        names[f"experts.{e}.up"] = f"adaptmlp_list.{e}.up_proj"
    return names


def _alias(key: str) -> bool:
    """Official keys that need no value of their own: the last expert's alias ``adaptmlp.*``
    (moe-adapters.md section 6.7) and the blocks' unused ``mean`` / ``std`` buffers."""
    parts = key.split(".")
    return "adaptmlp" in parts or parts[-1] in ("mean", "std")


def fit_expert_width(blocks, adapter_dim: int, patches: Patches) -> None:
    """The official expert's down projection is hard-coded to 64 outputs (adapter.py:35)."""
    if adapter_dim == OFFICIAL_BOTTLENECK:
        return
    for block in blocks:
        width = block.attn.embed_dim
        for expert in block.adaptmlp_list:
            expert.down_proj = nn.Linear(width, adapter_dim)
            expert.up_proj = nn.Linear(adapter_dim, width)
    patches.note(
        "tiny",
        f"every expert's down_proj / up_proj rebuilt with bottleneck {adapter_dim}",
        "cil/clip/adapter.py hard-codes a 64-wide down projection; --adapter-dim asked for another width",
    )


# ------------------------------------------------------------------------------- the block


def block_check(model_mod, ours_model: nn.Module, n_experts: int, adapter_dim: int, seed: int = 0) -> dict:
    """One MoE block both ways (see the module docstring); max |difference| of outputs and of the
    gradients of the experts, router and noise weights, eval and train mode."""
    from dmnsp.adapters import tower_blocks

    ours = copy.deepcopy(tower_blocks(ours_model, "visual")[0])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "adapter." in name and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    width, heads = ours.block.ln_1.normalized_shape[0], ours.block.attn.num_heads
    with contextlib.redirect_stdout(io.StringIO()):  # the constructor prints its tower
        theirs = model_mod.ResidualAttentionBlock(width, heads, None, "image")
    theirs.mlp.gelu = type(ours.block.mlp.gelu)()
    fit_expert_width([theirs], adapter_dim, Patches())
    state = {f"visual.transformer.resblocks.0.{k}": v for k, v in ours.state_dict().items()}
    mapped = to_official_layout(state, adapter_names(n_experts))
    load_checked(theirs, {k.split("resblocks.0.", 1)[1]: v for k, v in mapped.items()}, _alias)
    out: dict[str, Any] = {}
    for mode, batch in (("eval", 8), ("train", 8), ("eval", 128), ("train", 128)):
        x = torch.randn(batch, 17, width, generator=gen)  # (B, L, D), contiguous
        weights = torch.randn(batch, 17, width, generator=gen)
        ours.train(mode == "train")
        theirs.train(mode == "train")
        for m in (ours, theirs):
            m.zero_grad(set_to_none=True)
        torch.manual_seed(seed + 1)
        y_ours = ours(x.clone())
        (y_ours * weights).sum().backward()
        torch.manual_seed(seed + 1)
        y_theirs = theirs(x.clone().transpose(0, 1)).transpose(0, 1)
        (y_theirs * weights).sum().backward()
        g_ours = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
        g_mapped = to_official_layout(
            {f"visual.transformer.resblocks.0.{k}": v for k, v in g_ours.items()}, adapter_names(n_experts)
        )
        g_theirs = {f"visual.transformer.resblocks.0.{k}": p.grad for k, p in theirs.named_parameters()}
        grad_diff = max(
            float((g - g_theirs[k]).abs().max())
            for k, g in g_mapped.items()
            if g is not None and g_theirs.get(k) is not None
        )
        out[f"{mode} B={batch}"] = {
            "output_max_abs_diff": float((y_ours - y_theirs).detach().abs().max()),
            "output_scale": float(y_ours.detach().abs().max()),
            "grad_max_abs_diff": grad_diff,
        }
    return out


# ------------------------------------------------------------------------------- the run


def run_official(
    root: Path, ours, cfg: dict, numerics: str, patches: Patches, log: Path, stable: bool = False
) -> tuple[list[dict], dict]:
    from omegaconf import OmegaConf

    from dmnsp.loaders import derive_seed

    mods = import_official(root, ["continual_clip.models", "continual_clip.utils", "clip.clip", "clip.model"])
    models, main, clip_mod, model_mod = (
        mods["continual_clip.models"],
        mods["main"],
        mods["clip.clip"],
        mods["clip.model"],
    )
    session, seed = ours.session, cfg["seed"]
    n_experts = cfg["moe"]["experts"]
    if n_experts != 2 or cfg["moe"]["top_k"] != 2:
        raise ParityError(
            "the official CIL code hard-codes 2 experts and top-2 routing: run the project with those"
        )
    if stable:
        patches.setattr(
            model_mod,
            "SparseDispatcher",
            stable_dispatcher(model_mod),
            "align",
            "clip/model.py SparseDispatcher: each expert's samples in batch order (stable sort)",
            "the official torch.nonzero(gates).sort(0) is not a stable sort: on CPU each expert's samples "
            "come out permuted for batches above 8, so its dropout masks fall on other samples than in the "
            "project's batch-ordered mixture (--moe-stable-dispatch)",
        )
    block = block_check(model_mod, session.model, n_experts, cfg["adapter_dim"])
    # cil/main.py takes its workdir from the first 'cil' folder of the working directory
    work = Path(tempfile.mkdtemp(prefix="parity-moe-")) / "cil" / "run"
    work.mkdir(parents=True)
    order_file = work / "class_order.yaml"
    order_file.write_text(yaml.safe_dump({"class_order": [int(c) for c in session.scenario.class_order]}))
    weights = work / "tiny-openai-layout.pt"
    mapped = to_official_layout(ours.init_state, adapter_names(n_experts))
    # the backbone only: the adapters are copied after clip.load, once their width fits
    torch.save(
        to_official_layout({k: v for k, v in ours.init_state.items() if ".adapter." not in k}, {}), weights
    )
    ctx_len = int(ours.init_state["positional_embedding"].shape[0])
    off_cfg = OmegaConf.create(
        {
            "class_order": str(order_file),
            "dataset_root": "",
            "workdir": "",
            "log_path": "metrics.json",
            "model_name": str(weights),
            "prompt_template": cfg["prompt_template"],
            "batch_size": cfg["batch_size"],
            "increment": cfg["increment"],
            "initial_increment": cfg["initial_increment"],
            "scenario": "class",
            "dataset": cfg["dataset"],
            "method": "MoE-Adapters",
            "lr": cfg["lr"],
            "ls": cfg["ls"],
            "weight_decay": cfg["weight_decay"],
        }
    )
    state: dict[str, Any] = {"task": 0}
    records: list[dict[str, Any]] = []
    original_load = main.load_model

    def load_model(c, device):
        inst = original_load(c, device)
        fit_tiny_backbone(inst.model, session.model, patches)
        fit_expert_width([b for _, b in official_blocks(inst.model)], cfg["adapter_dim"], patches)
        load_checked(inst.model, mapped, _alias)
        align_logit_scale(inst.model, our_logit_scale(cfg, session.model), patches)  # after the load
        gate_log: dict[tuple[str, int], list[torch.Tensor]] = {}
        for tower, blocks in (
            ("visual", inst.model.visual.transformer.resblocks),
            ("text", inst.model.transformer.resblocks),
        ):
            for layer, block in enumerate(blocks):
                block.noisy_top_k_gating = _gate_recorder(block, inst.model, gate_log, (tower, layer))
        patches.note(
            "observe",
            "each official block's noisy_top_k_gating wrapped to record the gates in training",
            "gate statistics to compare with the project's (no effect on the computation)",
        )
        original_adaptation, original_forward = inst.adaptation, inst.forward

        def adaptation(task_id, *args, **kwargs):
            state["task"] = task_id
            gate_log.clear()
            torch.manual_seed(derive_seed(seed, task_id, "train"))  # the project reseeds per task
            original_adaptation(task_id, *args, **kwargs)
            check_logit_scale(inst.model, our_logit_scale(cfg, session.model))
            records.append(_snapshot(inst, gate_log, task_id))

        def forward(image, taskid):
            probs = original_forward(image, taskid)
            records[-1]["preds"].append(probs.argmax(dim=1).numpy())
            return probs

        inst.adaptation, inst.forward = adaptation, forward
        return inst

    def build_cl_scenarios(c, is_train, transforms) -> tuple[TaskSeries, list[str]]:
        return task_series(session, "train" if is_train else "test", transforms), list(
            session.data.class_names
        )

    cpu_patches(patches)
    patches.setattr(
        main,
        "load_model",
        load_model,
        "tiny",
        "main.load_model wrapped: the tiny model's sizes and weights, reseeding and recording",
        "clip.load builds the official CLIP from the project's checkpoint written in the OpenAI layout; "
        "the wrapper applies the [tiny] patches, copies the project's initial experts and routers, "
        "reseeds per task as the project does and records predictions (observation)",
    )
    patches.setattr(
        main,
        "build_cl_scenarios",
        build_cl_scenarios,
        "tiny",
        "main.build_cl_scenarios -> the project's Fashion-MNIST scenario",
        "offline data; same images, class order and task split as the project's run, transformed by "
        "the official clip.load transform main.py passes",
    )
    orig_tokenize = clip_mod.tokenize
    patches.setattr(
        clip_mod,
        "tokenize",
        lambda texts, context_length=77: orig_tokenize(texts, context_length=ctx_len),
        "tiny",
        f"clip.tokenize(texts) -> context_length={ctx_len}",
        "the tiny model's text context is 16 tokens; the official calls use the default 77",
    )
    patches.setattr(
        models,
        "DataLoader",
        LoaderFactory(seed, state, ["loader"]),
        "align",
        "continual_clip.models.DataLoader: num_workers 8 -> 0, shuffling from the project's seeded generator",
        "one process keeps the random crops in the project's global stream; the training loader draws "
        "the project's permutation (derive_seed(seed, task, 'loader'))",
    )
    patches.setattr(
        main,
        "DataLoader",
        LoaderFactory(seed, state, ["eval"], reseed="eval"),
        "align",
        "main.DataLoader (evaluation): global stream reseeded as the project does before evaluating",
        "each test image gets the same random crop and each block the same gate noise as in the "
        "project's evaluation",
    )
    if numerics == "cuda-foreach":
        _patch_adamw(patches)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main.continual_clip(off_cfg)
    finally:
        os.chdir(cwd)
        patches.restore()
    metrics = [yaml.safe_load(line) for line in (work / "metrics.json").read_text().splitlines()]
    for rec, m in zip(records, metrics, strict=False):
        rec["reported_acc"] = m.get("acc") if isinstance(m, dict) else None
        rec["preds"] = np.concatenate(rec["preds"]) if rec["preds"] else np.empty(0, dtype=np.int64)
    return records, block


def stable_dispatcher(model_mod):
    """The official ``SparseDispatcher`` with each expert's samples kept in batch order.

    The official one orders the (sample, expert) pairs with ``torch.nonzero(gates).sort(0)``, a
    sort that torch does not keep stable: on CPU the samples of each expert come out permuted for
    batches above 8, so the expert's dropout masks fall on other samples than in a batch-ordered
    mixture. This subclass runs the official constructor, then re-derives the same fields from a
    stable sort (``--moe-stable-dispatch``)."""

    class StableDispatcher(model_mod.SparseDispatcher):
        def __init__(self, num_experts, gates):
            super().__init__(num_experts, gates)
            pairs = torch.nonzero(gates)
            order = torch.sort(pairs[:, 1], stable=True).indices
            self._expert_index = pairs[order, 1:2]
            self._batch_index = pairs[order, 0]
            self._nonzero_gates = torch.gather(gates[self._batch_index.flatten()], 1, self._expert_index)

    return StableDispatcher


def _gate_recorder(block, clip_model, log: dict, key: tuple[str, int]):
    original = block.noisy_top_k_gating

    def wrapped(*args, **kwargs):
        gates, load = original(*args, **kwargs)
        if clip_model.training:
            log.setdefault(key, []).append(gates.detach().clone())
        return gates, load

    return wrapped


def _patch_adamw(patches: Patches) -> None:
    from dmnsp.optim import AdamW as EmulatedAdamW

    class CudaOrderAdamW(EmulatedAdamW):
        def __init__(self, params, lr=1e-3, weight_decay=0.0, **kw):
            super().__init__(params, lr=lr, weight_decay=weight_decay, numerics="cuda-foreach")

    patches.setattr(
        torch.optim,
        "AdamW",
        CudaOrderAdamW,
        "numerics",
        "torch.optim.AdamW -> dmnsp.optim.AdamW(numerics='cuda-foreach')",
        "the reference ran torch's foreach AdamW on a GPU; on CPU torch runs the single-tensor order",
    )


def _snapshot(inst, gate_log: dict, task: int) -> dict[str, Any]:
    gates = {
        tower: [
            torch.cat(gate_log[(tower, layer)]).mean(0).tolist() if (tower, layer) in gate_log else None
            for layer in range(12)
        ]
        for tower in ("visual", "text")
    }
    named = dict(inst.model.named_parameters())
    return {
        "task": task,
        "gates": gates,
        "params": {
            k: v.detach().clone()
            for k, v in named.items()
            if "adaptmlp" in k or "router" in k or "noise" in k
        },
        "preds": [],
    }


def compare(ours, theirs: list[dict], n_experts: int) -> list[dict[str, Any]]:
    rows = []
    for t, rec in enumerate(theirs):
        diag = ours.diags[t]
        mapped = to_official_layout(ours.states[t].adapters, adapter_names(n_experts))
        diff = {
            tower: max(
                float((mapped[k].double() - rec["params"][k].double()).abs().max())
                for k in rec["params"]
                if k in mapped and k.startswith("visual.") == (tower == "visual")
            )
            for tower in ("visual", "text")
        }
        gate_diff = max(
            abs(a - b)
            for tower in ("visual", "text")
            for ga, gb in zip(diag["gates"][tower], rec["gates"][tower], strict=True)
            if ga is not None and gb is not None
            for a, b in zip(ga, gb, strict=True)
        )
        rows.append(
            {
                "task": t,
                "acc_ours": ours.rows[t]["accuracy"],
                "acc_official": accuracy(rec["preds"], ours.labels[t]),
                "acc_official_reported": rec.get("reported_acc"),
                "agreement": agreement(ours.preds[t], rec["preds"]),
                "gate0_visual_ours": float(np.mean([g[0] for g in diag["gates"]["visual"]])),
                "gate0_visual_official": float(np.mean([g[0] for g in rec["gates"]["visual"]])),
                "gate0_text_ours": float(np.mean([g[0] for g in diag["gates"]["text"]])),
                "gate0_text_official": float(np.mean([g[0] for g in rec["gates"]["text"]])),
                "gate_max_abs_diff": gate_diff,
                "param_max_abs_diff": diff,
            }
        )
    return rows


def settings(args, ckpt: str, seed: int) -> dict:
    from parity_common import ROOT

    return {
        "method": "moe_adapters",
        "pretrained": ckpt,
        "dataset_root": str(ROOT / "data"),
        "max_train_per_class": args.train_per_class,
        "max_test_per_class": args.test_per_class,
        "adapter_dim": args.adapter_dim,
        "batch_size": args.batch_size or 128,
        "eval_batch_size": 64,  # the official evaluation batch
        "optimizer.numerics": args.numerics,
        "seed": seed,
        "threads": args.threads,
        "num_workers": 0,
        "device": "cpu",
    }


def run(args, root: Path) -> dict:
    from common import table
    from parity_common import our_config, pretrained_checkpoint, run_ours

    ckpt = pretrained_checkpoint(args.pretrained, args.threads)
    out: dict[str, Any] = {"method": "moe_adapters", "official": str(root), "seeds": {}}
    for seed in args.seeds:
        overrides = settings(args, ckpt, seed)
        cfg = our_config(overrides)
        print(
            "\nsettings:",
            ", ".join(f"{k}={v}" for k, v in overrides.items() if k != "dataset_root"),
            flush=True,
        )
        t0 = time.perf_counter()
        ours = run_ours(cfg)
        t_ours = time.perf_counter() - t0
        print(f"project run: {t_ours:.0f} s", flush=True)
        patches = Patches()
        log = Path(args.log_dir) / f"moe_adapters-official-seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        theirs, block = run_official(root, ours, cfg, args.numerics, patches, log, args.moe_stable_dispatch)
        t_off = time.perf_counter() - t0
        print(f"official run: {t_off:.0f} s (its output: {log})", flush=True)
        rows = compare(ours, theirs, cfg["moe"]["experts"])
        print("patches applied to the official code:")
        print("\n".join(patches.lines()))
        print(
            "block check (one official ResidualAttentionBlock vs the project's, same weights and seed): "
            + "; ".join(
                f"{mode}: output max |diff| {v['output_max_abs_diff']:.2e} (outputs up to {v['output_scale']:.2g}), "
                f"gradients max |diff| {v['grad_max_abs_diff']:.2e}"
                for mode, v in block.items()
            )
        )
        print(
            "random streams: "
            + (
                "aligned (--moe-stable-dispatch)"
                if args.moe_stable_dispatch
                else "NOT aligned in training: the official SparseDispatcher orders each expert's samples with "
                "an unstable sort, so its dropout masks fall on other samples (compare over seeds, or use "
                "--moe-stable-dispatch); gate noise and evaluation are aligned"
            )
        )
        print(
            table(
                [
                    [
                        r["task"],
                        fmt(r["acc_ours"]),
                        fmt(r["acc_official"]),
                        fmt(r["agreement"]),
                        f"{r['gate0_visual_ours']:.4f} / {r['gate0_visual_official']:.4f}",
                        f"{r['gate0_text_ours']:.4f} / {r['gate0_text_official']:.4f}",
                        fmt(r["gate_max_abs_diff"], ".2e"),
                        f"{r['param_max_abs_diff']['visual']:.2e} / {r['param_max_abs_diff']['text']:.2e}",
                    ]
                    for r in rows
                ],
                [
                    "task",
                    "acc ours",
                    "acc official",
                    "agreement",
                    "mean gate e0 visual ours / official",
                    "mean gate e0 text ours / official",
                    "max |Δ gate| (per block, expert)",
                    "max |Δ param| visual / text",
                ],
            )
        )
        out["seeds"][seed] = {
            "settings": overrides,
            "patches": [vars(p) for p in patches.items],
            "block_check": block,
            "rows": rows,
            "seconds": {"ours": t_ours, "official": t_off},
        }
    return out
