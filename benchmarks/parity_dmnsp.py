"""DMNSP beside the official RL-VIG/DMNSP code (``benchmarks/parity.py --method dmnsp``).

The official ``main.py`` runs as it is (its hydra function is called with a config, which hydra
passes straight through): its own ``ClassIncremental`` with its train loop, lambda, projection and
basis code, its own CLIP classes built by its own ``clip.load`` from the project's tiny checkpoint
(written in the OpenAI layout), its own transforms, AdamW and evaluation loop. What is replaced is
listed by :class:`parity_common.Patches` and printed with the results.
"""

from __future__ import annotations

import contextlib
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
    align_logit_scale,
    captured_locals,
    check_logit_scale,
    cpu_patches,
    fit_tiny_backbone,
    import_official,
    load_checked,
    official_blocks,
    our_logit_scale,
    task_series,
    to_official_layout,
)
from torch import nn

#: The project's adapter sub-modules under the official names (clip/adapter.py).
ADAPTER_NAMES = {"down": "adaptmlp.down_proj", "up": "adaptmlp.up_proj"}
#: The bottleneck the official adapter hard-codes (its down projection is always D -> 64).
OFFICIAL_BOTTLENECK = 64


def fit_adapter_width(clip_model: nn.Module, adapter_dim: int, patches: Patches) -> None:
    """The official adapter's down projection is hard-coded to 64 outputs: rebuild both projections
    when the run asks for another bottleneck."""
    if adapter_dim == OFFICIAL_BOTTLENECK:
        return
    for _, block in official_blocks(clip_model):
        width = block.attn.embed_dim
        block.adaptmlp.down_proj = nn.Linear(width, adapter_dim)
        block.adaptmlp.up_proj = nn.Linear(adapter_dim, width)
    patches.note(
        "tiny",
        f"adaptmlp.down_proj / up_proj rebuilt with bottleneck {adapter_dim}",
        "clip/adapter.py hard-codes a 64-wide down projection; --adapter-dim asked for another width",
    )


def _sequential_sampler(dataset, num_replicas=1, rank=0, **kwargs):
    return torch.utils.data.SequentialSampler(dataset)


def run_official(
    root: Path, ours: Any, cfg: dict, numerics: str, patches: Patches, log: Path
) -> list[dict[str, Any]]:
    """Run the official DMNSP main loop on the project's scenario; per task its predictions,
    labels, lambda, inf fraction, bases and adapter weights."""
    from omegaconf import OmegaConf

    from dmnsp.loaders import derive_seed

    mods = import_official(root, ["continual_clip.models", "continual_clip.utils", "clip.clip", "clip.model"])
    models, main, clip_mod = mods["continual_clip.models"], mods["main"], mods["clip.clip"]
    session = ours.session
    sc, seed = session.scenario, cfg["seed"]
    work = Path(tempfile.mkdtemp(prefix="parity-dmnsp-"))
    order_file = work / "class_order.yaml"
    order_file.write_text(yaml.safe_dump({"class_order": [int(c) for c in sc.class_order]}))
    weights = work / "tiny-openai-layout.pt"
    mapped = to_official_layout(ours.init_state, ADAPTER_NAMES)
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
            "weight_decay": cfg["weight_decay"],
            "l2": 0,
            "ce_method": 0,
            "method": "DMNSP",
            "lr": cfg["lr"],
            "ls": cfg["ls"],
        }
    )
    if cfg["epochs"] != models.EPOCH_NUM or cfg["LAMBDA_SCALE"] != models.LAMBDA_SCALE:
        raise ParityError(
            f"the official code hard-codes EPOCH_NUM={models.EPOCH_NUM}, LAMBDA_SCALE={models.LAMBDA_SCALE}; "
            "run the project with the same values"
        )

    state: dict[str, Any] = {"task": 0, "instance": None}
    records: list[dict[str, Any]] = []
    captured: list[dict] = []
    train_code = models.ClassIncremental.train.__code__

    original_load = main.load_model

    def load_model(c, device, origin_flag):
        inst = original_load(c, "cpu", origin_flag)
        fit_tiny_backbone(inst.model, session.model, patches)
        fit_adapter_width(inst.model, cfg["adapter_dim"], patches)
        load_checked(inst.model, mapped, lambda k: k.endswith((".mean", ".std")))
        align_logit_scale(inst.model, our_logit_scale(cfg, session.model), patches)  # after the load
        state["backbone"] = _backbone_probe(session, ours.init_state, inst.model, clip_mod, cfg)
        original_adaptation, original_forward = inst.adaptation, inst.forward

        def adaptation(task_id, *args, **kwargs):
            state["task"] = task_id
            torch.manual_seed(derive_seed(seed, task_id, "train"))  # the project reseeds per task
            n_before = len(captured)
            original_adaptation(task_id, *args, **kwargs)
            check_logit_scale(inst.model, our_logit_scale(cfg, session.model))
            frame = captured[-1] if len(captured) > n_before else {}
            records.append(_snapshot(inst, frame, task_id))

        def forward(image, taskid):
            probs = original_forward(image, taskid)
            records[-1].setdefault("preds", []).append(probs.argmax(dim=1).numpy())
            return probs

        inst.adaptation, inst.forward = adaptation, forward
        state["instance"] = inst
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
        "cpu",
        "main.load_model(cfg, devices[0]=0, ...) called with device 'cpu'",
        "main.py hard-codes device 0 (CUDA); the model is then given the tiny model's sizes and weights "
        "(see the [tiny] patches) and wrapped to reseed and record (observation)",
    )
    patches.setattr(
        main,
        "build_cl_scenarios",
        build_cl_scenarios,
        "tiny",
        "main.build_cl_scenarios -> the project's Fashion-MNIST scenario",
        "offline data; same images, class order and task split as the project's run, "
        "transformed by the official clip.load transform main.py passes",
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
        LoaderFactory(seed, state, ["loader", "basis"]),
        "align",
        "continual_clip.models.DataLoader: num_workers 8 -> 0, shuffling from the project's seeded generators",
        "one process keeps the random crops in the project's global stream; the training loader and the "
        "basis loader draw the project's permutations (derive_seed(seed, task, 'loader' / 'basis'))",
    )
    patches.setattr(
        main,
        "DataLoader",
        LoaderFactory(seed, state, ["eval"], reseed="eval"),
        "align",
        "main.DataLoader (evaluation): num_workers 8 -> 0, global stream reseeded as the project does",
        "each test image gets the same random crop as in the project's evaluation",
    )
    patches.setattr(
        main,
        "DistributedSampler",
        _sequential_sampler,
        "align",
        "main.DistributedSampler(num_replicas=1, shuffle=True) -> SequentialSampler",
        "accuracy does not depend on the order, but each image's random crop does; the project "
        "evaluates in dataset order",
    )
    if numerics == "cuda-foreach":
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
            "the reference ran torch's foreach AdamW on a GPU; on CPU torch runs the single-tensor "
            "order, so this emulates the CUDA order (--numerics cuda-foreach)",
        )

    cwd = os.getcwd()
    os.chdir(work)  # main.py writes config.yaml and metrics.json into the working folder
    try:
        with (
            open(log, "w") as out,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(out),
            captured_locals(train_code, captured),
        ):
            main.continual_clip(off_cfg)
    finally:
        os.chdir(cwd)
        patches.restore()
    if records:
        records[0]["backbone"] = state.get("backbone")
    metrics = [yaml.safe_load(line) for line in (work / "metrics.json").read_text().splitlines()]
    for rec, m in zip(records, metrics, strict=False):
        rec["reported_acc"] = m.get("acc") if isinstance(m, dict) else None
        rec["preds"] = np.concatenate(rec.get("preds", [np.empty(0, dtype=np.int64)]))
    return records


def _snapshot(inst, frame: dict, task: int) -> dict[str, Any]:
    """The official model's method state right after training ``task``."""
    lam = frame.get("lamda")
    lam_t = (
        None
        if task == 0 or lam is None
        else torch.tensor([[float(x) for x in row] for row in lam], dtype=torch.float64)
    )
    optimizer = frame.get("optimizer")
    inf = total = 0
    named = dict(inst.model.named_parameters())
    for name, p in named.items():
        if "visual" in name and "adapt" in name and optimizer is not None and p in optimizer.state:
            sq = optimizer.state[p]["exp_avg_sq"]
            inf += int(torch.isinf(sq).sum())
            total += sq.numel()
    return {
        "task": task,
        "lambda": lam_t,
        "inf_fraction": inf / total if total else None,
        "bases": [inst.visual_U[i].detach().clone() for i in sorted(inst.visual_U)],
        "adapters": {k: v.detach().clone() for k, v in named.items() if "adapt" in k},
        "preds": [],
    }


def compare(ours, theirs: list[dict], test_labels: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per task: accuracy both sides, prediction agreement, lambda, inf fraction, bases, weights."""
    from parity_common import accuracy, agreement, max_abs_diff

    rows = []
    for t, rec in enumerate(theirs):
        diag = ours.diags[t]
        our_lam = None if diag.get("lambda") is None else torch.tensor(diag["lambda"], dtype=torch.float64)
        lam_diff = None if our_lam is None or rec["lambda"] is None else max_abs_diff(our_lam, rec["lambda"])
        our_bases = ours.states[t].bases["visual"]
        basis_diff = max(
            max_abs_diff(v @ v.t(), w @ w.t()) for v, w in zip(our_bases, rec["bases"], strict=True)
        )
        mapped = to_official_layout(ours.states[t].adapters, ADAPTER_NAMES)
        weight_diff = {
            tower: max(
                max_abs_diff(mapped[k], rec["adapters"][k])
                for k in rec["adapters"]
                if k.startswith("visual.") == (tower == "visual")
            )
            for tower in ("visual", "text")
        }
        rows.append(
            {
                "task": t,
                "acc_ours": ours.rows[t]["accuracy"],
                "acc_official": accuracy(rec["preds"], test_labels[t]),
                "acc_official_reported": rec.get("reported_acc"),
                "agreement": agreement(ours.preds[t], rec["preds"]),
                "lambda_mean_ours": None if our_lam is None else float(our_lam.mean()),
                "lambda_mean_official": None if rec["lambda"] is None else float(rec["lambda"].mean()),
                "lambda_max_abs_diff": lam_diff,
                "inf_ours": diag["inf_fraction_exp_avg_sq"]["visual"],
                "inf_official": rec["inf_fraction"],
                "projector_max_abs_diff": basis_diff,
                "adapter_max_abs_diff": weight_diff,
            }
        )
    return rows


def backbone_check(ours_model: nn.Module, official_clip: nn.Module, images, tokens, official_tokens) -> dict:
    """Image and text features of both models on the same inputs (eval mode, no dropout)."""
    from dmnsp.model import encode_image, encode_text

    ours_model.eval()
    official_clip.eval()
    with torch.no_grad():
        fi, ft = encode_image(ours_model, images), encode_text(ours_model, tokens)
        oi = official_clip.encode_image(images)[0]
        ot = official_clip.encode_text(official_tokens)[0]
    oi, ot = oi / oi.norm(dim=-1, keepdim=True), ot / ot.norm(dim=-1, keepdim=True)
    return {
        "tokens_equal": bool(torch.equal(tokens, official_tokens)),
        "image_max_abs_diff": float((fi - oi).abs().max()),
        "text_max_abs_diff": float((ft - ot).abs().max()),
    }


def _backbone_probe(session, init_state: dict, official_clip: nn.Module, clip_mod, cfg: dict) -> dict:
    """:func:`backbone_check` on 32 test images, with every adapter given random weights first
    (seeded, both sides the same), so the adapters' placement is checked too, not only the backbone."""
    import copy

    from dmnsp.model import tokenize_prompts

    ref = copy.deepcopy(session.model)
    ref.load_state_dict(init_state)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    probe = copy.deepcopy(official_clip)
    load_checked(
        probe, to_official_layout(ref.state_dict(), ADAPTER_NAMES), lambda k: k.endswith((".mean", ".std"))
    )
    data = session.heldout(0)
    images = torch.stack([session.bundle.eval_transform(data.base[int(i)][0]) for i in data.indices[:32]])
    names = session.scenario.class_names
    tokens = tokenize_prompts(session.bundle.tokenizer, names, cfg["prompt_template"])
    official_tokens = clip_mod.tokenize([cfg["prompt_template"].format(n) for n in names])
    return backbone_check(ref, probe, images, tokens, official_tokens)


# ------------------------------------------------------------------------------- the run


def settings(args, ckpt: str, seed: int) -> dict:
    """The project's run config for one seed (printed with the results)."""
    from parity_common import ROOT

    return {
        "method": "dmnsp",
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


@contextlib.contextmanager
def _reference_gram(on: bool):
    """Diagnosis on the project's side (``--dmnsp-reference-gram``): its Gram matrices summed as the
    reference sums them, one (D x D) product per sample over its tokens, then over the batch
    (``torch.bmm(...).sum(0)``), instead of one product over all rows."""
    import dmnsp.nullspace as ns

    original = ns.gram
    if on:
        ns.gram = lambda a: torch.bmm(a.float().transpose(1, 2), a.float()).sum(0)
        print("project-side diagnostic patch: dmnsp.nullspace.gram = per-sample bmm summed over the batch")
    try:
        yield
    finally:
        ns.gram = original


def run(args, root: Path) -> dict:
    from common import table
    from parity_common import fmt, our_config, pretrained_checkpoint, run_ours

    ckpt = pretrained_checkpoint(args.pretrained, args.threads)
    out: dict[str, Any] = {"method": "dmnsp", "official": str(root), "seeds": {}}
    for seed in args.seeds:
        overrides = settings(args, ckpt, seed)
        cfg = our_config(overrides)
        print(
            "\nsettings:",
            ", ".join(f"{k}={v}" for k, v in overrides.items() if k != "dataset_root"),
            flush=True,
        )
        t0 = time.perf_counter()
        with _reference_gram(args.dmnsp_reference_gram):
            ours = run_ours(cfg)
        t_ours = time.perf_counter() - t0
        print(f"project run: {t_ours:.0f} s", flush=True)
        patches = Patches()
        log = Path(args.log_dir) / f"dmnsp-official-seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        theirs = run_official(root, ours, cfg, args.numerics, patches, log)
        t_off = time.perf_counter() - t0
        print(f"official run: {t_off:.0f} s (its output: {log})", flush=True)
        rows = compare(ours, theirs, ours.labels)
        print("patches applied to the official code:")
        print("\n".join(patches.lines()))
        print(f"backbone check at init: {theirs[0].get('backbone') if theirs else None}")
        print(
            table(
                [
                    [
                        r["task"],
                        fmt(r["acc_ours"]),
                        fmt(r["acc_official"]),
                        fmt(r["agreement"]),
                        fmt(r["lambda_mean_ours"], ".3f"),
                        fmt(r["lambda_mean_official"], ".3f"),
                        fmt(r["lambda_max_abs_diff"], ".2e"),
                        fmt(r["inf_ours"], ".4f"),
                        fmt(r["inf_official"], ".4f"),
                        fmt(r["projector_max_abs_diff"], ".2e"),
                        f"{r['adapter_max_abs_diff']['visual']:.2e} / {r['adapter_max_abs_diff']['text']:.2e}",
                    ]
                    for r in rows
                ],
                [
                    "task",
                    "acc ours",
                    "acc official",
                    "agreement",
                    "mean λ ours",
                    "mean λ official",
                    "max |Δλ|",
                    "inf ours",
                    "inf official",
                    "max |ΔVVᵀ|",
                    "max |Δ adapter| visual / text",
                ],
            )
        )
        out["seeds"][seed] = {
            "settings": overrides,
            "patches": [vars(p) for p in patches.items],
            "rows": rows,
            "seconds": {"ours": t_ours, "official": t_off},
        }
    return out
