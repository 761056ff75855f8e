"""RAPF beside the official linlany/RAPF code (``benchmarks/parity.py --method rapf``; rapf.md
section 9).

Two comparisons. The functions: the official ``shrink_cov``, ``sample``,
``ClassIncrementalCLIP.analyze_mean_cov`` and ``ClassIncrementalCLIP.mix_matrix`` (the instance
made without its constructor, ``object.__new__`` plus ``nn.Module.__init__``, with the attributes
those methods read) against the project's ``shrink_cov``, ``sample``, ``class_statistics`` and
``fuse`` on the same tensors, seeded identically. The run: the official ``main.py`` as it is (its
``run_class_incremental``: pseudo-features, hard pairs and hinge, Adam with MultiStepLR, class
statistics, fusion, evaluation), its ``ClassIncrementalCLIP`` built by OpenAI's ``clip.load`` from
the project's tiny checkpoint, on the project's scenario; per task both accuracies, the
prediction agreement, the fused map's difference and the class statistics' differences.

On CPU the official code computes in float32 except that it rounds every input batch to fp16
(``image.type(torch.float16)``, models.py:116); the project's ``rapf.precision: fp32`` does not
round the input, its ``fp16`` emulates the GPU run (features, ``W x`` and logits rounded). The run
compares ``fp32`` (``--rapf-precision``), and names the input rounding as a difference.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from parity_common import (
    LoaderFactory,
    Patches,
    TaskSeries,
    accuracy,
    agreement,
    align_logit_scale,
    check_logit_scale,
    fit_tiny_backbone,
    fmt,
    import_official,
    load_checked,
    rounded,
    task_series,
    to_official_layout,
)
from torch import nn


def bare_instance(models_mod, mix_bias: float = 0.6):
    """The official ``ClassIncrementalCLIP`` without its constructor: only what ``analyze_mean_cov``
    and ``mix_matrix`` read."""
    inst = object.__new__(models_mod.ClassIncrementalCLIP)
    nn.Module.__init__(inst)
    inst.class_mean_list, inst.class_cov_list, inst.class_edge_distance = [], [], []
    inst.mix_b = mix_bias
    inst.old_adapter = None
    return inst


def function_checks(models_mod, dim: int = 64, seed: int = 0) -> dict[str, float]:
    """Max |difference| of each official helper against the project's, on hand-made tensors."""
    import dmnsp.methods.rapf as ours

    gen = torch.Generator().manual_seed(seed)
    out = {}
    a = torch.randn(dim, dim, generator=gen)
    cov = a @ a.t() / dim + 0.1 * torch.eye(dim)
    out["shrink_cov"] = float((models_mod.shrink_cov(cov) - ours.shrink_cov(cov)).abs().max())
    mean = torch.randn(dim, generator=gen)
    torch.manual_seed(seed + 1)
    theirs = models_mod.sample(mean, cov, 40, shrink=False)
    torch.manual_seed(seed + 1)
    mine = ours.sample(mean, torch.linalg.cholesky(cov), 40)
    out["sample"] = float((theirs - mine).abs().max())
    torch.manual_seed(seed + 2)
    theirs = models_mod.sample(mean, cov, 40, shrink=True)
    torch.manual_seed(seed + 2)
    mine = ours.sample(mean, torch.linalg.cholesky(ours.shrink_cov(cov)), 40)
    out["sample_shrink"] = float((theirs - mine).abs().max())
    feats = torch.randn(90, dim, generator=gen)
    labels = torch.tensor([5, 3, 4] * 30)
    inst = bare_instance(models_mod)
    inst.analyze_mean_cov(feats, labels)
    means, covs = ours.class_statistics(feats, labels)
    out["class_mean"] = float((torch.stack(inst.class_mean_list) - means).abs().max())
    out["class_cov"] = max(float((c - d).abs().max()) for c, d in zip(inst.class_cov_list, covs, strict=True))
    w_old, w_new = torch.randn(dim, dim, generator=gen), torch.randn(dim, dim, generator=gen)
    for mix_bias in (0.0, 0.6):
        inst = bare_instance(models_mod, mix_bias)
        inst.adapter = nn.Linear(dim, dim, bias=False)
        inst.old_adapter = nn.Linear(dim, dim, bias=False)
        inst.adapter.weight.data, inst.old_adapter.weight.data = w_new.clone(), w_old.clone()
        inst.mix_matrix()
        fused, _ = ours.fuse(w_new, w_old, mix_bias)
        out[f"mix_matrix(mix_bias={mix_bias})"] = float((inst.adapter.weight.data - fused).abs().max())
    return out


def run_official(
    root: Path, ours, cfg: dict, patches: Patches, log: Path, round_inputs: bool = False
) -> tuple[list[dict], dict]:
    from omegaconf import OmegaConf

    from dmnsp.loaders import derive_seed
    from dmnsp.methods.rapf import initial_map

    mods = import_official(root, ["continual_clip.models", "continual_clip.utils", "clip"])
    models, main, clip_mod = mods["continual_clip.models"], mods["main"], mods["clip"]
    functions = function_checks(models)
    session, seed = ours.session, cfg["seed"]
    work = Path(tempfile.mkdtemp(prefix="parity-rapf-")) / "cil" / "run"
    work.mkdir(parents=True)
    order_file = work / "class_order.yaml"
    order_file.write_text(yaml.safe_dump({"class_order": [int(c) for c in session.scenario.class_order]}))
    weights = work / "tiny-openai-layout.pt"
    mapped = to_official_layout(ours.init_state, {})
    torch.save(mapped, weights)
    ctx_len = int(ours.init_state["positional_embedding"].shape[0])
    opts = cfg["rapf"]
    off_cfg = OmegaConf.create(
        {
            "class_order": str(order_file),
            "dataset_root": "",
            "workdir": "",
            "log_path": "metric.json",
            "model_name": str(weights),
            "prompt_template": cfg["prompt_template"],
            "batch_size": cfg["eval_batch_size"],
            "initial_increment": cfg["initial_increment"],
            "increment": cfg["increment"],
            "scenario": "class",
            "dataset": cfg["dataset"],
            "num_workers": 0,
            "train_batch_size": cfg["batch_size"],
            "epochs": cfg["epochs"],
            "lr": cfg["lr"],
            "fp16": False,
            "seed": seed,
            "milestones": list(opts["milestones"]),
            "beta": opts["beta"],
            "mix_bias": opts["mix_bias"],
            "threshold": opts["threshold"],
            "shrinkage": opts["shrinkage"],
        }
    )
    state: dict[str, Any] = {"task": 0}
    records: list[dict[str, Any]] = []
    original_load = main.load_model
    dim = session.model.visual.output_dim

    def load_model(c, device):
        inst = original_load(c, device)
        fit_tiny_backbone(inst, session.model, patches)
        # OpenAI's build_model casts the model to fp16 before loading (convert_weights) and clip.load
        # casts it back on CPU: the project's fp32 checkpoint would come out fp16-rounded
        load_checked(inst, mapped, lambda k: k.startswith(("adapter.", "old_adapter.")))
        patches.note(
            "tiny",
            "the backbone weights copied again in float32 after clip.load",
            "OpenAI's build_model loads the state dict into an fp16 model (convert_weights), harmless for "
            "OpenAI's fp16 checkpoints but a rounding of the project's fp32 tiny one",
        )
        inst.adapter = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            inst.adapter.weight.copy_(
                initial_map(dim, opts["init"], derive_seed(seed, "init", "rapf"), "cpu")
            )
        align_logit_scale(inst, 100.0 if _fixed_scale() else float(inst.logit_scale.exp()), patches)
        original_adaptation, original_forward = inst.adaptation, inst.forward

        def adaptation(task_id, *args, **kwargs):
            state["task"] = task_id
            torch.manual_seed(derive_seed(seed, task_id, "train"))  # the project reseeds per task
            random.seed(derive_seed(seed, task_id, "rapf"))  # ... and its epoch shuffles
            original_adaptation(task_id, *args, **kwargs)
            check_logit_scale(inst, 100.0 if _fixed_scale() else float(inst.logit_scale.exp()))
            pairs = [] if inst.hard_pairs is None else inst.hard_pairs.tolist()
            records.append({"task": task_id, "hard_pairs": pairs, "preds": []})

        def forward(image, *args, **kwargs):
            out = original_forward(image, *args, **kwargs)
            if not inst.training and not kwargs and not args:  # the evaluation call
                records[-1]["preds"].append(out[0].argmax(dim=1).numpy())
            return out

        inst.adaptation, inst.forward = adaptation, forward
        state["instance"] = inst
        return inst

    def build_cl_scenarios(c, is_train, transforms) -> tuple[TaskSeries, list[str]]:
        return task_series(session, "train" if is_train else "test", transforms), list(
            session.data.class_names
        )

    def snapshot_after_fusion(_orig=models.ClassIncrementalCLIP.mix_matrix):
        def mix_matrix(self):
            _orig(self)
            records[-1]["map"] = self.adapter.weight.detach().clone()
            records[-1]["means"] = torch.stack([m.float() for m in self.class_mean_list])
            records[-1]["covs"] = [c.float() for c in self.class_cov_list]

        return mix_matrix

    patches.setattr(
        main,
        "load_model",
        load_model,
        "tiny",
        "main.load_model wrapped: the tiny model's sizes, a 64 x 64 map with the project's initial "
        "weights, reseeding and recording",
        "clip.load builds OpenAI's CLIP from the project's checkpoint written in the OpenAI layout; "
        "models.py hard-codes nn.Linear(512, 512) for ViT-B/16's embedding (the tiny one is 64); the "
        "wrapper reseeds torch and Python's random per task as the project does and records "
        "predictions (observation)",
    )
    patches.setattr(
        main,
        "build_cl_scenarios",
        build_cl_scenarios,
        "tiny",
        "main.build_cl_scenarios -> the project's Fashion-MNIST scenario",
        "offline data; same images, class order and task split, transformed by the clip.load "
        "preprocess main.py passes",
    )
    orig_tokenize = clip_mod.tokenize
    patches.setattr(
        models.clip,
        "tokenize",
        lambda texts, context_length=77, truncate=False: orig_tokenize(texts, context_length=ctx_len),
        "tiny",
        f"clip.tokenize(texts) -> context_length={ctx_len}",
        "the tiny model's text context is 16 tokens; the official calls use the default 77",
    )
    patches.setattr(
        main,
        "DataLoader",
        LoaderFactory(seed, state, ["loader", "stats", "eval"]),
        "align",
        f"main.DataLoader: num_workers {16} -> 0, the training loader shuffled by the project's seeded generator",
        "the training batches follow the project's permutation (derive_seed(seed, task, 'loader'))",
    )
    patches.setattr(
        models.ClassIncrementalCLIP,
        "mix_matrix",
        snapshot_after_fusion(),
        "observe",
        "ClassIncrementalCLIP.mix_matrix wrapped to keep the fused map and the class statistics",
        "the state to compare after each task (no effect on the computation)",
    )
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main.run_class_incremental(off_cfg, torch.device("cpu"))
    finally:
        os.chdir(cwd)
        patches.restore()
    for rec in records:
        rec["preds"] = np.concatenate(rec["preds"]) if rec["preds"] else np.empty(0, dtype=np.int64)
    return records, functions


def _round_inputs(session) -> None:
    """Both sides' images made fp16-representable before either model sees them (the official
    forward casts every batch to fp16, the project's fp32 mode does not): isolates that difference."""

    b = session.bundle
    b.train_transform, b.eval_transform = (
        rounded(b.train_transform, "float16"),
        rounded(b.eval_transform, "float16"),
    )


def _fixed_scale() -> bool:
    """Whether the project code under test multiplies RAPF's logits by a fixed 100 (before the
    logit_scale run key existed)."""
    import dmnsp.model as dm

    return not hasattr(dm, "logit_scale")


def compare(ours, theirs: list[dict]) -> list[dict[str, Any]]:
    from dmnsp.methods.rapf import COVS, MAP, MEANS

    rows = []
    for t, rec in enumerate(theirs):
        st = ours.states[t].bases
        diag = ours.diags[t].get("rapf", {})
        our_pairs = diag.get("hard_pair_list") or []
        rows.append(
            {
                "task": t,
                "acc_ours": ours.rows[t]["accuracy"],
                "acc_official": accuracy(rec["preds"], ours.labels[t]),
                "agreement": agreement(ours.preds[t], rec["preds"]),
                "pairs_ours": len(our_pairs),
                "pairs_official": len(rec["hard_pairs"]),
                "pairs_equal": sorted(map(tuple, our_pairs)) == sorted(map(tuple, rec["hard_pairs"])),
                "map_max_abs_diff": float((st[MAP][0].double() - rec["map"].double()).abs().max()),
                "map_scale": float(rec["map"].abs().max()),
                "mean_max_abs_diff": float((st[MEANS][0].double() - rec["means"].double()).abs().max()),
                "cov_max_abs_diff": max(
                    float((a.double() - b.double()).abs().max())
                    for a, b in zip(st[COVS], rec["covs"], strict=True)
                ),
                "fusion_mask_mean_ours": (diag.get("fusion") or {}).get("mask_mean"),
            }
        )
    return rows


def settings(args, ckpt: str, seed: int) -> dict:
    from parity_common import ROOT

    out = {
        "method": "rapf",
        "pretrained": ckpt,
        "dataset_root": str(ROOT / "data"),
        "max_train_per_class": args.train_per_class,
        "max_test_per_class": args.test_per_class,
        "rapf.precision": args.rapf_precision,
        "eval_batch_size": 128,  # the official configs' batch_size (evaluation)
        "optimizer.numerics": "cpu",
        "seed": seed,
        "threads": args.threads,
        "num_workers": 0,
        "device": "cpu",
    }
    if args.batch_size:
        out["batch_size"] = args.batch_size
    if args.epochs:
        out["epochs"] = args.epochs
    return out


def run(args, root: Path) -> dict:
    from common import table
    from parity_common import our_config, pretrained_checkpoint, run_ours

    ckpt = pretrained_checkpoint(args.pretrained, args.threads)
    out: dict[str, Any] = {"method": "rapf", "official": str(root), "seeds": {}}
    for seed in args.seeds:
        overrides = settings(args, ckpt, seed)
        cfg = our_config(overrides)
        shown = {**overrides, "batch_size": cfg["batch_size"], "epochs": cfg["epochs"]}
        print(
            "\nsettings:", ", ".join(f"{k}={v}" for k, v in shown.items() if k != "dataset_root"), flush=True
        )
        t0 = time.perf_counter()
        ours = run_ours(cfg, prepare=_round_inputs if args.rapf_fp16_inputs else None)
        t_ours = time.perf_counter() - t0
        print(f"project run: {t_ours:.0f} s", flush=True)
        patches = Patches()
        log = Path(args.log_dir) / f"rapf-official-seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        theirs, functions = run_official(root, ours, cfg, patches, log, args.rapf_fp16_inputs)
        if args.rapf_fp16_inputs:
            patches.note(
                "align",
                "both sides' input images rounded to fp16 by the data transform (--rapf-fp16-inputs)",
                "isolates the one arithmetic difference on CPU: the official forward casts each batch to fp16",
            )
        t_off = time.perf_counter() - t0
        print(f"official run: {t_off:.0f} s (its output: {log})", flush=True)
        print("patches applied to the official code:")
        print("\n".join(patches.lines()))
        print("function checks (max |official - project| on the same tensors and seeds):")
        print("  " + ", ".join(f"{k} {v:.2e}" for k, v in functions.items()))
        rows = compare(ours, theirs)
        print(
            table(
                [
                    [
                        r["task"],
                        fmt(r["acc_ours"]),
                        fmt(r["acc_official"]),
                        fmt(r["agreement"]),
                        f"{r['pairs_ours']} / {r['pairs_official']}"
                        + ("" if r["pairs_equal"] else " (differ)"),
                        f"{r['map_max_abs_diff']:.2e} (of {r['map_scale']:.2g})",
                        f"{r['mean_max_abs_diff']:.2e} / {r['cov_max_abs_diff']:.2e}",
                        fmt(r["fusion_mask_mean_ours"], ".3f"),
                    ]
                    for r in rows
                ],
                [
                    "task",
                    "acc ours",
                    "acc official",
                    "agreement",
                    "hard pairs ours / official",
                    "max |Δ fused W|",
                    "max |Δ mean| / |Δ cov|",
                    "fusion mask mean (ours)",
                ],
            )
        )
        out["seeds"][seed] = {
            "settings": shown,
            "patches": [vars(p) for p in patches.items],
            "functions": functions,
            "rows": rows,
            "seconds": {"ours": t_ours, "official": t_off},
        }
    return out
