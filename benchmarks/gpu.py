"""GPU check, ready to run on one CUDA GPU in under 10 minutes; one JSON file and a printed table.

    python3 benchmarks/gpu.py                       # on the GPU machine, from the repository root
    python3 benchmarks/gpu.py --dry-run             # here: CPU, tiny model, every code path (< 2 min)

What it does, in order (each part records its figures, or why it was skipped, and never stops the
others):

1. **CUDA tests**: pytest on the test files that exercise CUDA (``tests/test_optim.py`` with the
   optimiser numerics tests, ``tests/test_model.py`` with device resolution, and any file with a
   ``pytest.mark.cuda`` test). ``--dry-run`` only collects them.
2. **AdamW numerics, bitwise**: ``dmnsp.optim.AdamW(params, lr, betas, eps, weight_decay,
   numerics="cuda-foreach")`` against ``torch.optim.AdamW(foreach=True)`` on CUDA (and
   ``numerics="cpu"`` against ``foreach=False``), with gradients of 1e15 to 1e26 so that
   ``exp_avg_sq`` overflows float32 as in the faithful mode: parameters and optimiser state must be
   equal bit for bit after every step. Skipped, saying so, while ``dmnsp.optim`` does not exist.
3. **Step time**: ViT-B/16 (random init, adapters r = 64) at batch 128, a ``finetune`` step against
   a ``dmnsp`` step (projection through 10 tasks of faithful bases), their ratio, ``plan.apply``
   alone, and the peak GPU memory of each.
4. **Per-task jobs**: ``python -m dmnsp train-task`` on the GPU, task 0 and task 9 (resuming a
   checkpoint with 9 tasks of bases), batch 128, 2 steps, on a generated image-folder dataset
   (no data set is reachable): the job's wall time minus the compute it reports (train, lambda,
   basis, eval) is its fixed overhead (interpreter, imports, CUDA start, model build, data,
   checkpoint I/O). The lambda + basis seconds of task 9 are the per-task cost of the method.
   The overhead is given as a fraction of a CIFAR100 10-10 task (5,000 images, 4 epochs: 161
   steps of 128) and of a 2-2 task (1,000 images: 33 steps), using the measured dmnsp step.

Without a package registry: where ``open_clip``, ``ftfy``, ``jsonschema`` (or pytest and their
dependencies) cannot be imported, the wheels in ``.whl/`` (``bash benchmarks/gpu_wheels.sh`` fills
it where PyPI is reachable) are installed with ``pip install --no-index --no-deps --target
/tmp/dmnsp-gpu-site`` (unzipped if pip itself is missing) and the script restarts with that folder
and the repository on ``PYTHONPATH``, which the jobs it starts inherit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
SITE = Path(os.environ.get("DMNSP_GPU_SITE", "/tmp/dmnsp-gpu-site"))
# Modules this check imports (directly, in dmnsp, or in the tests) -> the distribution whose wheel has
# them. torch, torchvision, timm, numpy, pandas, matplotlib, yaml, PIL, tqdm, safetensors and
# huggingface_hub are expected on the GPU machine (timm needs the last four).
NEEDED = {
    "open_clip": "open_clip_torch",
    "ftfy": "ftfy",
    "wcwidth": "wcwidth",
    "regex": "regex",
    "jsonschema": "jsonschema",
    "jsonschema_specifications": "jsonschema_specifications",
    "referencing": "referencing",
    "rpds": "rpds_py",
    "attrs": "attrs",
    "typing_extensions": "typing_extensions",
    "pytest": "pytest",
    "pluggy": "pluggy",
    "iniconfig": "iniconfig",
    "pygments": "pygments",
    "packaging": "packaging",
    "hypothesis": "hypothesis",
    "sortedcontainers": "sortedcontainers",
}
CIFAR_STEPS = {"10-10": 4 * 40 + 1, "2-2": 4 * 8 + 1}  # epochs x ceil(images / 128) + 1 (dmnsp.train)


# ------------------------------------------------------------------------------------ wheels


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def compatible(wheel: Path) -> bool:
    """Whether this interpreter can import ``wheel`` (its python and ABI tags; Linux x86_64 assumed)."""
    py, abi, _platform = wheel.stem.split("-")[-3:]
    minor = sys.version_info.minor
    if abi == "abi3":  # stable ABI: any CPython at least as new as the one it was built for
        return any(t.startswith("cp3") and int(t[3:]) <= minor for t in py.split("."))
    if py.startswith("cp"):
        return f"cp3{minor}" in py.split(".")
    return True  # pure Python (py3-none-any)


def install_wheels(wheels: list[Path], site: Path) -> str:
    """pip install --no-index --no-deps --target; without pip, unzip (a wheel is a site-packages tree)."""
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade"]
    proc = subprocess.run([*cmd, "--target", str(site), *map(str, wheels)], capture_output=True, text=True)
    if proc.returncode == 0:
        return "pip install --no-index --no-deps --target"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    return f"unzipped (pip failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]})"


def ensure_imports() -> None:
    """Install the missing modules' wheels from .whl/ and restart with them on PYTHONPATH."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing:
        return
    if os.environ.get("DMNSP_GPU_BOOTSTRAPPED") == "1":
        raise SystemExit(
            f"gpu.py: still cannot import {', '.join(missing)} after installing .whl/ into {SITE}"
        )
    wanted = {_dist(NEEDED[m]) for m in missing}
    wheels = sorted(
        w for w in WHEELS.glob("*.whl") if _dist(w.name.split("-")[0]) in wanted and compatible(w)
    )
    lacking = wanted - {_dist(w.name.split("-")[0]) for w in wheels}
    if lacking:
        raise SystemExit(
            f"gpu.py: cannot import {', '.join(missing)} and {WHEELS} has no wheel for "
            f"{', '.join(sorted(lacking))} that CPython {platform.python_version()} can use: run "
            f"`PYVERS={sys.version_info.major}.{sys.version_info.minor} bash benchmarks/gpu_wheels.sh` "
            "where PyPI is reachable and bring .whl/ along"
        )
    how = install_wheels(wheels, SITE)
    print(f"gpu.py: {len(wheels)} wheels for {', '.join(missing)} -> {SITE} ({how}); restarting", flush=True)
    path = [str(SITE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "DMNSP_GPU_BOOTSTRAPPED": "1", "PYTHONPATH": os.pathsep.join(path)}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ------------------------------------------------------------------------------------ parts


def environment() -> dict:
    import torch

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "site": str(SITE) if os.environ.get("DMNSP_GPU_BOOTSTRAPPED") else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            devices=torch.cuda.device_count(),
        )
    return out


def cuda_tests(dry_run: bool, timeout: float) -> dict:
    files = [ROOT / "tests" / "test_optim.py", ROOT / "tests" / "test_model.py"]
    files += [p for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.cuda" in p.read_text()]
    files = [str(p.relative_to(ROOT)) for p in dict.fromkeys(files) if p.exists()]
    if not files:
        return {"skipped": "no CUDA test files in tests/"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files]
    if dry_run:
        cmd.append("--collect-only")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"files": files, "error": f"pytest ran longer than {timeout:.0f} s"}
    out = proc.stdout + proc.stderr
    summary = next(
        (
            line
            for line in reversed(out.splitlines())
            if re.search(r"\d+ (passed|failed|error|test|skipped)", line)
        ),
        "",
    )
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|tests? collected)", summary)
    }
    result = {"files": files, "rc": proc.returncode, "summary": summary.strip("= "), "counts": counts}
    if dry_run:
        result["note"] = "collected only (--dry-run): no CUDA here"
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    if skips:
        result["skipped_reasons"] = skips[:20]
    if proc.returncode not in (0, 5) or "failed" in counts or "error" in counts or "errors" in counts:
        result["tail"] = out[-4000:]
    return result


def _bits(t):
    import torch

    t = t.detach().float().contiguous()
    return t.view(torch.int32)


def adamw_numerics(device: str) -> dict:
    """dmnsp.optim.AdamW against torch.optim.AdamW, bitwise, on gradients that overflow exp_avg_sq."""
    import torch

    try:
        from dmnsp.optim import AdamW  # issue 11 (numerics) adds it
    except ImportError as exc:
        return {"skipped": f"dmnsp.optim is absent ({exc}); the bitwise AdamW check runs once it exists"}
    pairs = [("cpu", False)]
    if device == "cuda":
        pairs.insert(0, ("cuda-foreach", True))
    results = {}
    if device != "cuda":
        results["cuda-foreach"] = {"skipped": "no CUDA: the cuda-foreach numerics are only defined on CUDA"}
    for numerics, foreach in pairs:
        gen = torch.Generator().manual_seed(0)
        shapes = [(64, 768), (768, 64), (768,), (64,)]
        init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
        ours = [p.clone().to(device).requires_grad_() for p in init]
        ref = [p.clone().to(device).requires_grad_() for p in init]
        hyper = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
        try:
            opt = AdamW(ours, numerics=numerics, **hyper)
        except TypeError as exc:
            results[numerics] = {
                "error": f"dmnsp.optim.AdamW(params, lr, betas, eps, weight_decay, numerics=...): {exc}"
            }
            continue
        torch_opt = torch.optim.AdamW(ref, foreach=foreach, **hyper)
        mismatches, steps = [], 0
        for step, exponent in enumerate(range(15, 27)):  # 1e15 .. 1e26: exp_avg_sq = g^2 overflows from ~1e19
            grads = [torch.randn(s, generator=gen) * 10.0**exponent for s in shapes]
            for p, q, g in zip(ours, ref, grads, strict=True):
                p.grad, q.grad = g.to(device), g.to(device).clone()
            opt.step()
            torch_opt.step()
            steps += 1
            for i, (p, q) in enumerate(zip(ours, ref, strict=True)):
                tensors = {"param": (p, q)}
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in opt.state.get(p, {}) and key in torch_opt.state[q]:
                        tensors[key] = (opt.state[p][key], torch_opt.state[q][key])
                for name, (a, b) in tensors.items():
                    if not torch.equal(_bits(a), _bits(b)):
                        mismatches.append(f"step {step} (grad 1e{exponent}) tensor {i} {name}")
        inf = float(
            torch.cat([torch_opt.state[q]["exp_avg_sq"].isinf().flatten() for q in ref]).float().mean()
        )
        results[numerics] = {
            "against": f"torch.optim.AdamW(foreach={foreach}) on {device}",
            "steps": steps,
            "bitwise_equal": not mismatches,
            "mismatches": mismatches[:10],
            "inf_fraction_exp_avg_sq": inf,
        }
    return results


def step_times(model: str, batch: int, reps: int, device: str) -> dict:
    import torch
    from common import median
    from projection import StepBench

    bench = StepBench(model, 64 if model == "ViT-B-16" else 16, batch, 10, torch.device(device))
    times = bench.run(reps, 50 if device == "cuda" else 10, both=True)
    out = {
        "model": model,
        "batch": batch,
        "device": device,
        "finetune_s": median(times["finetune"]),
        "dmnsp_s": median(times["dmnsp"]),
        "apply_s": median(times["apply"]),
        "repeats": reps,
        "lambda_range": bench.lambda_range,
    }
    out["ratio"] = out["dmnsp_s"] / out["finetune_s"]
    if device == "cuda":
        for name, projected in (("finetune", False), ("dmnsp", True)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                bench.step(projected)
            torch.cuda.synchronize()
            out[f"peak_gpu_mib_{name}"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_gpu_mib"] = "no CUDA"
    del bench
    return out


def image_folder(root: Path, classes: int, train: int, test: int, size: int = 32) -> Path:
    """A generated ImageFolder dataset (train/<class>/*.png, test/<class>/*.png)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(c * 53) % 256, (c * 97) % 256, (c * 151) % 256])
            for i in range(n):
                pixels = np.clip(colour + rng.integers(-30, 31, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def jobs(model: str, device: str, batch: int, reps: int, tmp: Path) -> dict:
    from common import median, write_yaml
    from dag import fabricate_checkpoint, train_task_job

    data = image_folder(tmp / "data", classes=10, train=batch + 2, test=8)
    cfg = {
        "dataset": "imagefolder",
        "dataset_root": str(data),
        "model_name": model,
        "pretrained": None,
        "initial_increment": 1,
        "increment": 1,
        "adapter_dim": 64 if model == "ViT-B-16" else 16,
        "batch_size": batch,
        "eval_batch_size": 128,
        "epochs": 4,
        "max_steps": 2,
        "method": "dmnsp",
        "device": device,
        "num_workers": 0,
        "threads": min(8, os.cpu_count() or 1) if device == "cuda" else 1,
    }
    cfg_path = write_yaml(tmp / "job.yaml", cfg)
    resume = fabricate_checkpoint(cfg_path, 8, tmp / "task8" / "checkpoint.pt")
    runs: dict[str, list[dict]] = {"task 0": [], "task 9": []}
    for r in range(reps):
        runs["task 0"].append(train_task_job(cfg_path, 0, None, tmp / f"r{r}" / "task0"))
        runs["task 9"].append(train_task_job(cfg_path, 9, resume, tmp / f"r{r}" / "task9"))
    out = {"model": model, "device": device, "batch": batch, "repeats": reps}
    for label, rs in runs.items():
        out[label] = {
            "wall_s": median([x["wall"] for x in rs]),
            "compute_s": median([x["compute"] for x in rs]),
            "overhead_s": median([x["overhead"] for x in rs]),
            "seconds": rs[0]["seconds"],
            "peak_mem_mb": rs[0].get("peak_mem_mb"),
        }
    t9 = out["task 9"]["seconds"]
    out["lambda_plus_basis_s"] = t9["lambda"] + t9["basis"]
    out["checkpoint_mib"] = resume.stat().st_size / 2**20
    return out


def fractions(step: dict, job: dict) -> dict:
    """Job overhead (worst of task 0 / 9) against one CIFAR100 task's compute at the measured step."""
    overhead = max(job["task 0"]["overhead_s"], job["task 9"]["overhead_s"])
    out = {"overhead_s": overhead}
    for split, steps in CIFAR_STEPS.items():
        compute = steps * step["dmnsp_s"] + job["lambda_plus_basis_s"]
        out[split] = {
            "steps": steps,
            "task_compute_s": compute,
            "overhead_over_compute": overhead / compute,
            "overhead_share_of_job": overhead / (overhead + compute),
        }
    return out


# ------------------------------------------------------------------------------------ report


def rows(res: dict) -> list[list[str]]:
    def get(*keys, fmt="{}"):
        x = res
        for k in keys:
            if not isinstance(x, dict) or k not in x:
                return "-"
            x = x[k]
        return fmt.format(x) if not isinstance(x, str) else x

    out = [
        [
            "device",
            get("environment", "device") if res["environment"].get("cuda_available") else "CPU (no CUDA)",
        ]
    ]
    t = res.get("cuda_tests", {})
    out.append(
        [
            "CUDA tests",
            t.get("skipped") or t.get("error") or f"{t.get('summary')} ({', '.join(t.get('files', []))})",
        ]
    )
    for name, r in (res.get("adamw") or {}).items():
        if name == "skipped":
            out.append(["AdamW numerics, bitwise", r])
            continue
        if isinstance(r, dict) and "bitwise_equal" in r:
            verdict = "EQUAL" if r["bitwise_equal"] else f"DIFFERENT ({'; '.join(r['mismatches'][:3])})"
            out.append(
                [
                    f"AdamW numerics={name} vs {r['against']}",
                    f"{verdict} over {r['steps']} steps, inf(exp_avg_sq) {r['inf_fraction_exp_avg_sq']:.2f}",
                ]
            )
        else:
            out.append([f"AdamW numerics={name}", (r or {}).get("skipped") or (r or {}).get("error", "-")])
    s = res.get("steps", {})
    if "error" in s or "skipped" in s:
        out.append(["step time", s.get("error") or s.get("skipped")])
    elif s:
        out.append(
            [
                f"{s['model']} step, batch {s['batch']}: finetune / dmnsp",
                f"{s['finetune_s'] * 1e3:.1f} ms / {s['dmnsp_s'] * 1e3:.1f} ms (ratio {s['ratio']:.3f}); plan.apply {s['apply_s'] * 1e3:.2f} ms",
            ]
        )
        out.append(
            [
                "peak GPU memory (finetune / dmnsp steps)",
                f"{get('steps', 'peak_gpu_mib_finetune', fmt='{:.0f}')} / {get('steps', 'peak_gpu_mib_dmnsp', fmt='{:.0f}')} MiB"
                if "peak_gpu_mib_dmnsp" in s
                else s.get("peak_gpu_mib", "-"),
            ]
        )
    j = res.get("jobs", {})
    if "error" in j or "skipped" in j:
        out.append(["per-task jobs", j.get("error") or j.get("skipped")])
    elif j:
        for label in ("task 0", "task 9"):
            x = j[label]
            out.append(
                [
                    f"train-task job, {label} ({j['model']}, batch {j['batch']})",
                    f"wall {x['wall_s']:.1f} s, compute {x['compute_s']:.1f} s, overhead {x['overhead_s']:.1f} s, peak memory {x['peak_mem_mb'] or 0:.0f} MB",
                ]
            )
        out.append(
            ["lambda + basis per task (task 9, 9 tasks of bases)", f"{j['lambda_plus_basis_s'] * 1e3:.0f} ms"]
        )
    f = res.get("fractions", {})
    for split in CIFAR_STEPS:
        if split in f:
            x = f[split]
            out.append(
                [
                    f"job overhead vs a CIFAR100 {split} task ({x['steps']} steps)",
                    f"{100 * x['overhead_over_compute']:.0f} % of its compute ({x['task_compute_s']:.1f} s); {100 * x['overhead_share_of_job']:.0f} % of the job",
                ]
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, tests collected only")
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], help="default: cuda if available (cpu with --dry-run)"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny CLIP instead of ViT-B/16")
    parser.add_argument(
        "--json", type=Path, help="output file (default: $OUT/gpu-check.json, else ./gpu-check.json)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=540, help="skip what would start after this many seconds"
    )
    args = parser.parse_args(argv)
    ensure_imports()
    # The jobs this starts (python -m dmnsp) import this checkout's dmnsp, wherever they run.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    import torch

    device = args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py: --device cuda but torch.cuda.is_available() is False")
    if device == "cpu":  # a shared CPU: more threads than idle cores make every step spin (README)
        torch.set_num_threads(1)
    tiny = args.tiny or device == "cpu"
    model = "dmnsp-tiny" if tiny else "ViT-B-16"
    batch = 128 if device == "cuda" else 16
    start = time.perf_counter()
    res: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "dry-run" if args.dry_run else "full"}
    res["environment"] = environment()
    print(json.dumps(res["environment"]), flush=True)

    def part(name: str, fn, *a):
        if time.perf_counter() - start > args.budget_s:
            res[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            return
        t0 = time.perf_counter()
        print(f"== {name} ...", flush=True)
        try:
            res[name] = fn(*a)
        except Exception as exc:  # one broken part must not hide the others' figures
            res[name] = {
                "error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1][:500]}"
            }
        print(f"   {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    part("cuda_tests", cuda_tests, args.dry_run, 240.0)
    part("adamw", adamw_numerics, device)
    part("steps", step_times, model, batch, 20 if device == "cuda" else 3, device)
    with tempfile.TemporaryDirectory(prefix="dmnsp-gpu-") as tmp:
        part("jobs", jobs, model, device, batch, 2 if device == "cuda" else 1, Path(tmp))
    if "dmnsp_s" in res.get("steps", {}) and "lambda_plus_basis_s" in res.get("jobs", {}):
        res["fractions"] = fractions(res["steps"], res["jobs"])
    res["seconds"] = time.perf_counter() - start
    out = args.json or Path(os.environ.get("OUT") or ".") / "gpu-check.json"
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    from common import table

    print(table(rows(res), ["GPU check", f"{'dry run: ' if args.dry_run else ''}{model} on {device}"]))
    print(f"wrote {out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
