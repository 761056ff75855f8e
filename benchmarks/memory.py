"""Peak memory of a training job: one CLIP in memory, and nothing that grows from task to task
except the null-space bases (D × (D-1) floats per layer per task in faithful mode).

    .venv/bin/python benchmarks/memory.py            # tiny 5-task run + ViT-B-16 job phases (~5 min)
    .venv/bin/python benchmarks/memory.py --quick    # tiny run only, few steps (under a minute)
    .venv/bin/python benchmarks/memory.py --checkpoint-only [--baseline DIR]   # checkpoint I/O only

Each measurement runs in a fresh child process. The peak resident set (VmHWM) is reset before
each phase by writing 5 to /proc/self/clear_refs (Linux), so every phase and every task has its
own peak instead of the process's running maximum; where resetting is not allowed the running
maximum (ru_maxrss) is shown instead and said so.

Part 1, tiny CLIP (12 layers, width 64), Fashion-MNIST 2-2, 5 tasks in one process as
``dmnsp run`` does: per task the peak and final RSS, live tensors (count and bytes, found through
the garbage collector), the bases' bytes and the number of CLIP models alive. Expected growth per
task: 12 × 64 × 63 float32 = 189 KiB (faithful concat, visual tower).

Part 2, ViT-B-16 (random init, adapters r=64; Fashion-MNIST resized to 224 px as a stand-in), the
phases of a resumed ``train-task`` job at task 9 with 9 tasks of bases in its checkpoint: imports,
session (data + model), checkpoint load, one training step of batch 8 + bases + evaluation,
checkpoint save.

Part 3, checkpoint I/O: a ViT-B-16 faithful state with 35 tasks of visual bases (12 layers x 768 x
35*767 float32, ~1 GB; 2-2 at task 49 carries 1.4 GB) and ViT-B-16-sized adapters, saved by one
child and loaded by another: peak RSS above the RSS before the call, as a multiple of the file's
size (target: at most 1.3x for both). ``--baseline DIR`` measures DIR's ``dmnsp.checkpoint`` too
(e.g. a checkout of the commit before format 2), alternating with this tree's.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    cores,
    fashion_root,
    load_line,
    machine_line,
    python,
    run_measured,
    table,
    verdict,
    write_yaml,
)

MiB = 2**20
SLACK_MIB = 16.0  # allocator, GC-timing and page noise on top of the bases (per-task peaks vary ~±10 MiB)


# ------------------------------------------------------------------------------------ in the child


def _status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def _trim() -> None:
    """Collect garbage and hand free heap pages back (glibc), so RSS readings compare across tasks."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    _trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak(resettable: bool) -> float:
    return _status()["VmHWM"] if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _live_tensors() -> tuple[int, float]:
    """Tensors reachable by the garbage collector: count and MiB (shared storages counted once)."""
    import torch

    gc.collect()
    seen, count, size = set(), 0, 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - exotic objects (weakrefs to freed things) may refuse
            continue
        count += 1
        key = (storage.data_ptr(), obj.device.type)
        if key not in seen:
            seen.add(key)
            size += storage.nbytes()
    return count, size / MiB


def _clip_models() -> int:
    import open_clip

    kinds = tuple(
        c for c in (getattr(open_clip, "CLIP", None), getattr(open_clip, "CustomTextCLIP", None)) if c
    )
    return sum(isinstance(o, kinds) for o in gc.get_objects())


def child_tiny(cfg_path: str) -> None:
    resettable = _reset_peak()
    from dmnsp.checkpoint import TaskState
    from dmnsp.config import load_config
    from dmnsp.runner import Session

    cfg = load_config(cfg_path)
    session = Session(cfg, progress=False)
    state = TaskState()
    print(
        json.dumps(
            {
                "phase": "session",
                "rss": _status()["VmRSS"],
                "peak": _peak(resettable),
                "clips": _clip_models(),
                "resettable": resettable,
            }
        ),
        flush=True,
    )
    for t in range(session.n_tasks):
        _reset_peak()
        state, row, diag = session.run_task(t, state)
        peak = _peak(resettable)
        del row, diag
        count, mib = _live_tensors()
        _trim()
        bases = sum(v.numel() * v.element_size() for vs in state.bases.values() for v in vs) / MiB
        print(
            json.dumps(
                {
                    "task": t,
                    "peak": peak,
                    "rss": _status()["VmRSS"],
                    "tensors": count,
                    "tensor_mib": mib,
                    "bases_mib": bases,
                    "clips": _clip_models(),
                    "columns": [int(v.shape[1]) for v in state.bases.get("visual", [])][:1],
                }
            ),
            flush=True,
        )


def child_vit(cfg_path: str, resume: str, out_dir: str) -> None:
    resettable = _reset_peak()
    start = [_status()["VmRSS"]]  # RSS when the current phase began (after gc + trim)

    def phase(name: str, t0: float, **extra) -> None:
        print(
            json.dumps(
                {
                    "phase": name,
                    "start": start[0],
                    "peak": _peak(resettable),
                    "rss": _status()["VmRSS"],
                    "seconds": time.perf_counter() - t0,
                    **extra,
                }
            ),
            flush=True,
        )
        _reset_peak()
        start[0] = _status()["VmRSS"]

    t0 = time.perf_counter()
    import torch  # noqa: F401

    from dmnsp.checkpoint import load_checkpoint
    from dmnsp.config import load_config
    from dmnsp.runner import Session, write_task_outputs

    phase("imports", t0)
    cfg = load_config(cfg_path)
    t0 = time.perf_counter()
    session = Session(cfg, progress=False)
    params = sum(p.numel() * p.element_size() for p in session.model.parameters()) / MiB
    phase("session: data + model", t0, clips=_clip_models(), params_mib=params)
    t0 = time.perf_counter()
    state = load_checkpoint(resume, cfg, expect_task=8)
    bases = sum(v.numel() * v.element_size() for vs in state.bases.values() for v in vs) / MiB
    phase("checkpoint load", t0, bases_mib=bases, file_mib=Path(resume).stat().st_size / MiB)
    t0 = time.perf_counter()
    state, row, diag = session.run_task(9, state)
    bases = sum(v.numel() * v.element_size() for vs in state.bases.values() for v in vs) / MiB
    phase("task 9: 1 step (batch 8) + bases + eval", t0, bases_mib=bases, clips=_clip_models())
    t0 = time.perf_counter()
    write_task_outputs(out_dir, state, row, diag, cfg)
    phase("checkpoint save", t0, file_mib=(Path(out_dir) / "checkpoint.pt").stat().st_size / MiB)


def _state_of_size(tasks: int):
    """A ViT-B-16 task state: faithful visual bases of ``tasks`` tasks and r = 64 adapters."""
    import torch

    from dmnsp.checkpoint import TaskState

    width, layers, r = 768, 12, 64
    bases = {"visual": [torch.ones(width, tasks * (width - 1)) for _ in range(layers)]}
    adapters = {}
    for tower, w in (("visual", width), ("text", 512)):
        for i in range(layers):
            key = f"{tower}.transformer.resblocks.{i}.adapter"
            adapters[f"{key}.down.weight"] = torch.randn(r, w)
            adapters[f"{key}.down.bias"] = torch.randn(r)
            adapters[f"{key}.up.weight"] = torch.randn(w, r)
            adapters[f"{key}.up.bias"] = torch.randn(w)
    return TaskState(tasks - 1, adapters, bases, list(range(2 * tasks)))


def child_checkpoint(op: str, tree: str, path: str, tasks: int) -> None:
    """Save (``op = save``) or load one checkpoint with ``tree``'s dmnsp; peak RSS of the call."""
    sys.path.insert(0, tree)
    import open_clip  # noqa: F401 - imported in every train-task job before it saves (format 1 asked it its version)
    import torch  # noqa: F401

    from dmnsp.checkpoint import load_checkpoint, save_checkpoint
    from dmnsp.config import validate

    cfg = validate({"dataset": "fashion-mnist", "model_name": "dmnsp-tiny", "pretrained": None})
    state = _state_of_size(tasks) if op == "save" else None
    resettable = _reset_peak()
    start = _status()["VmRSS"] if resettable else _peak(False)
    t0 = time.perf_counter()
    if op == "save":
        save_checkpoint(path, state, cfg)
    else:
        state = load_checkpoint(path, cfg, expect_task=tasks - 1)
    seconds = time.perf_counter() - t0
    peak = _peak(resettable)
    print(
        json.dumps(
            {
                "op": op,
                "start": start,
                "peak": peak,
                "seconds": seconds,
                "file_mib": Path(path).stat().st_size / MiB,
                "resettable": resettable,
                "module": sys.modules["dmnsp.checkpoint"].__file__,
            }
        ),
        flush=True,
    )


# ------------------------------------------------------------------------------------ in the parent


def _lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def tiny(tmp: Path, quick: bool) -> list[list]:
    cfg = {
        "dataset": "fashion-mnist",
        "dataset_root": str(fashion_root(tmp / "data")),
        "model_name": "dmnsp-tiny",
        "pretrained": None,
        "initial_increment": 2,
        "increment": 2,
        "max_train_per_class": 600,
        "max_test_per_class": 500,
        "adapter_dim": 16,
        "batch_size": 128,
        "epochs": 4,
        "method": "dmnsp",
        "device": "cpu",
        "threads": cores(),
        "num_workers": 0,
        "max_steps": 5 if quick else None,
    }
    path = write_yaml(tmp / "tiny.yaml", cfg)
    res = run_measured([python(), __file__, "--child-tiny", str(path)], timeout=3600)
    if res["rc"] != 0:
        raise RuntimeError(res["output"][-3000:])
    lines = _lines(res["output"])
    session, tasks = lines[0], [x for x in lines if "task" in x]
    per_task = 12 * 64 * 63 * 4 / MiB
    rows = [
        [
            "session (data + model)",
            f"{session['peak']:.1f}",
            f"{session['rss']:.1f}",
            "-",
            "-",
            "-",
            session["clips"],
        ]
    ]
    for x in tasks:
        rows.append(
            [
                f"task {x['task']}",
                f"{x['peak']:.1f}",
                f"{x['rss']:.1f}",
                x["tensors"],
                f"{x['tensor_mib']:.3f}",
                f"{x['bases_mib']:.3f}",
                x["clips"],
            ]
        )
    how = "per-task peak (VmHWM reset per task)" if session["resettable"] else "running max (ru_maxrss)"
    print(
        table(
            rows,
            [
                f"tiny, {'max_steps 5' if quick else 'full 41 steps'} per task",
                f"{how} MiB",
                "RSS at end, after gc + trim, MiB",
                "live tensors",
                "tensor MiB",
                "bases MiB",
                "CLIP models",
            ],
        )
    )
    t1, t3 = tasks[1], tasks[3]
    expected = 2 * per_task
    d_peak, d_tensor = t3["peak"] - t1["peak"], t3["tensor_mib"] - t1["tensor_mib"]
    print(
        f"  bases growth per task: 12 layers x 64 x 63 float32 = {per_task * 1024:.0f} KiB; "
        f"task 1 -> 3 expected +{expected:.3f} MiB"
    )
    print(
        f"  task 1 -> 3: peak {d_peak:+.2f} MiB, live tensor bytes {d_tensor:+.3f} MiB, live tensors "
        f"{t3['tensors'] - t1['tensors']:+d}; job peak RSS {max(x['peak'] for x in lines):.0f} MiB; {load_line()}"
    )
    return [
        [
            "tiny: peak RSS task 3 - task 1 <= bases growth + slack",
            f"{d_peak:+.2f} MiB (bases {expected:+.3f})",
            f"<= {expected + SLACK_MIB:.2f} MiB",
            verdict(d_peak, expected + SLACK_MIB),
        ],
        [
            "tiny: live tensor bytes task 3 - task 1 = bases growth",
            f"{d_tensor:+.3f} MiB",
            f"{expected:.3f} MiB +- 0.01",
            "PASS" if abs(d_tensor - expected) < 0.01 else "MISS",
        ],
        [
            "tiny: CLIP models in memory",
            str(max(x["clips"] for x in tasks)),
            "1",
            "PASS" if max(x["clips"] for x in tasks) == 1 else "MISS",
        ],
    ]


def vit(tmp: Path) -> list[list]:
    from dag import fabricate_checkpoint, job_config

    path = write_yaml(
        tmp / "vit.yaml", {**job_config("ViT-B-16", fashion_root(tmp / "data")), "threads": cores()}
    )
    resume = fabricate_checkpoint(path, 8, tmp / "task8" / "checkpoint.pt")
    res = run_measured(
        [python(), __file__, "--child-vit", str(path), str(resume), str(tmp / "task9")], timeout=3600
    )
    if res["rc"] != 0:
        raise RuntimeError(res["output"][-3000:])
    phases = _lines(res["output"])
    rows = []
    for p in phases:
        extra = ", ".join(
            f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in p.items()
            if k not in ("phase", "start", "peak", "rss", "seconds")
        )
        rows.append(
            [
                p["phase"],
                f"{p['start']:.0f}",
                f"{p['peak']:.0f}",
                f"{p['peak'] - p['start']:+.0f}",
                f"{p['rss']:.0f}",
                f"{p['seconds']:.1f}",
                extra,
            ]
        )
    print(
        table(
            rows,
            [
                "ViT-B-16 train-task phases (task 9, 9 tasks of bases)",
                "RSS at start MiB",
                "phase peak MiB",
                "peak - start",
                "RSS at end MiB",
                "seconds",
                "notes (MiB)",
            ],
        )
    )
    by = {p["phase"]: p for p in phases}
    session, save, load = by["session: data + model"], by["checkpoint save"], by["checkpoint load"]
    job_peak = max(p["peak"] for p in phases)  # wait4's ru_maxrss is unreliable once VmHWM was reset
    print(
        f"  session build adds {session['rss'] - session['start']:.0f} MiB of RSS for {session['params_mib']:.0f} MiB "
        f"of parameters (one CLIP; two would need {2 * session['params_mib']:.0f}); job peak RSS {job_peak:.0f} MiB"
    )
    print(
        f"  checkpoint load: peak {load['peak'] - load['start']:+.0f} MiB for a {load['file_mib']:.0f} MiB file "
        f"({(load['peak'] - load['start']) / load['file_mib']:.1f}x); save: peak {save['peak'] - save['start']:+.0f} "
        f"MiB for a {save['file_mib']:.0f} MiB file ({(save['peak'] - save['start']) / save['file_mib']:.1f}x); "
        f"{load_line()}"
    )
    clips = max(p.get("clips", 0) for p in phases)
    return [
        ["ViT-B-16: CLIP models in memory", str(clips), "1", "PASS" if clips == 1 else "MISS"],
        [
            "ViT-B-16: job peak RSS (task 9, 9 tasks of bases, batch 8)",
            f"{job_peak:.0f} MiB",
            "report",
            f"parameters {session['params_mib']:.0f} MiB",
        ],
    ]


def checkpoint_io(tmp: Path, tasks: int, baseline: Path | None, reps: int) -> list[list]:
    from common import ROOT

    trees = {"this tree": ROOT} if baseline is None else {"baseline": baseline, "this tree": ROOT}
    results: dict[tuple[str, str], list[dict]] = {}
    for rep in range(reps):
        for name, tree in trees.items():
            path = tmp / f"ckpt-{name.replace(' ', '-')}.pt"
            for op in ("save", "load"):
                res = run_measured(
                    [python(), __file__, "--child-checkpoint", op, str(tree), str(path), str(tasks)],
                    timeout=3600,
                )
                if res["rc"] != 0:
                    raise RuntimeError(res["output"][-3000:])
                (line,) = _lines(res["output"])
                results.setdefault((name, op), []).append(line)
                print(
                    f"  [{rep + 1}/{reps}] {name}: {op} {line['file_mib']:.0f} MiB in {line['seconds']:.1f} s, "
                    f"peak {line['peak'] - line['start']:+.0f} MiB = {(line['peak'] - line['start']) / line['file_mib']:.2f}x "
                    f"({line['module']}); {load_line()}",
                    flush=True,
                )
            path.unlink()
    rows, targets = [], []
    for (name, op), lines in results.items():
        multiples = [(x["peak"] - x["start"]) / x["file_mib"] for x in lines]
        worst = max(multiples)
        rows.append(
            [
                name,
                op,
                f"{lines[0]['file_mib']:.0f} MiB",
                ", ".join(f"{x['peak'] - x['start']:+.0f}" for x in lines),
                ", ".join(f"{m:.2f}x" for m in multiples),
                ", ".join(f"{x['seconds']:.1f} s" for x in lines),
            ]
        )
        targets.append(
            [
                f"checkpoint {op} ({name}): peak RSS above the start / file size",
                f"{worst:.2f}x of {lines[0]['file_mib']:.0f} MiB (worst of {len(lines)})",
                "<= 1.3x",
                "PASS" if worst <= 1.3 else "MISS",
            ]
        )
    how = "VmHWM reset before the call" if results[next(iter(results))][0]["resettable"] else "ru_maxrss"
    print(
        table(
            rows,
            ["tree", "operation", "file", f"peak above start, MiB ({how})", "x file size", "seconds"],
        )
    )
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run with 5 steps per task; no ViT-B-16")
    parser.add_argument("--child-tiny", help=argparse.SUPPRESS)
    parser.add_argument("--child-vit", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-checkpoint", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-only", action="store_true", help="only the checkpoint I/O part")
    parser.add_argument(
        "--checkpoint-tasks",
        type=int,
        help="tasks of bases in the checkpoint (default 35: ~1 GB; --quick 10)",
    )
    parser.add_argument("--baseline", type=Path, help="another checkout whose checkpoint I/O to measure too")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of the checkpoint I/O part")
    args = parser.parse_args(argv)
    if args.child_checkpoint:
        op, tree, path, tasks = args.child_checkpoint
        child_checkpoint(op, tree, path, int(tasks))
        return 0
    if args.child_tiny:
        child_tiny(args.child_tiny)
        return 0
    if args.child_vit:
        child_vit(*args.child_vit)
        return 0
    print(machine_line())
    targets = []
    with tempfile.TemporaryDirectory(prefix="dmnsp-bench-mem-") as tmp:
        if not args.checkpoint_only:
            print("\n== tiny CLIP, 5 tasks in one process ==", flush=True)
            targets += tiny(Path(tmp), args.quick)
            if not args.quick:
                print("\n== ViT-B-16, one train-task job ==", flush=True)
                targets += vit(Path(tmp))
        tasks = args.checkpoint_tasks or (10 if args.quick else 35)
        print(f"\n== checkpoint I/O: {tasks} tasks of ViT-B-16 faithful bases ==", flush=True)
        targets += checkpoint_io(Path(tmp), tasks, args.baseline, 1 if args.quick else args.reps)
    print("\n== targets ==")
    print(table(targets, ["target", "measured", "target", "verdict / note"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
