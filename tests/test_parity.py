"""benchmarks/parity.py: one clear line when the official checkout is missing or wrong, and its pure
helpers (agreement, the open_clip -> OpenAI weight mapping on a tiny random model, the scenario
surface the official loops read). No official code exists in CI: the harness itself is run by hand
(benchmarks/README.md, "Parity with the official code")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import parity_common as pc  # noqa: E402


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / "parity.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def _fake_checkout(tmp_path: Path, method: str, drop: str | None = None) -> Path:
    """A folder holding the marker files of ``method``'s repository (no real code)."""
    repo = pc.OFFICIAL[method]
    top = tmp_path / method
    code = top / repo.subdir if repo.subdir else top
    for rel, needles in repo.markers.items():
        f = code / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("\n".join(n for n in needles if n != drop) + "\n")
    return top


@pytest.mark.parametrize("method", ["dmnsp", "moe_adapters", "rapf"])
def test_missing_official_is_one_line(method):
    proc = _run("--method", method)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--official is required" in lines[0] and pc.OFFICIAL[method].name in lines[0]
    assert "Traceback" not in proc.stderr


def test_nonexistent_and_file_paths_are_one_line(tmp_path):
    for path, words in [(tmp_path / "nope", "no such file"), (tmp_path / "f.txt", "is not a folder")]:
        if path.suffix:
            path.write_text("x")
        proc = _run("--method", "dmnsp", "--official", str(path))
        assert proc.returncode == 2
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr


def test_wrong_repository_is_named(tmp_path):
    rapf = _fake_checkout(tmp_path, "rapf")
    proc = _run("--method", "dmnsp", "--official", str(rapf))
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "not a checkout of RL-VIG/DMNSP" in line and "looks like linlany/RAPF" in line


def test_a_checkout_missing_one_marker_is_refused(tmp_path):
    top = _fake_checkout(tmp_path, "dmnsp", drop="visual_U")
    with pytest.raises(pc.ParityError, match="does not contain 'visual_U'"):
        pc.official_root("dmnsp", top)


def test_roots_are_found_for_each_repository(tmp_path):
    for method in pc.OFFICIAL:
        top = _fake_checkout(tmp_path, method)
        root = pc.official_root(method, top)
        assert root == (top / pc.OFFICIAL[method].subdir).resolve()
    # MoE's code root may also be given directly
    assert pc.official_root("moe_adapters", tmp_path / "moe_adapters" / "cil").name == "cil"


def test_missing_packages_are_named_in_one_line(monkeypatch):
    monkeypatch.setitem(
        pc.OFFICIAL,
        "dmnsp",
        pc.OfficialRepo("RL-VIG/DMNSP", {}, ("numpy", "no_such_module_xyz"), install="pip install it"),
    )
    assert pc.missing_modules(["numpy", "no_such_module_xyz"]) == ["no_such_module_xyz"]
    with pytest.raises(pc.ParityError) as err:
        pc.check_modules("dmnsp")
    msg = str(err.value)
    assert "no_such_module_xyz" in msg and "numpy" not in msg.split("import ")[1].split(",")[0]
    assert "\n" not in msg


def test_agreement_counts_equal_predictions():
    assert pc.agreement([0, 1, 2, 3], [0, 1, 2, 3]) == 1.0
    assert pc.agreement(np.array([0, 1, 2, 3]), np.array([0, 2, 2, 0])) == 0.5
    with pytest.raises(ValueError, match="different length"):
        pc.agreement([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="no predictions"):
        pc.agreement([], [])


def test_patch_register_restores_and_lists():
    class Target:
        x = 1

    patches = pc.Patches()
    patches.setattr(Target, "x", 2, "cpu", "Target.x -> 2", "because")
    patches.setattr(Target, "y", 3, "align", "Target.y added", "because too")
    assert (Target.x, Target.y) == (2, 3)
    patches.restore()
    assert Target.x == 1 and not hasattr(Target, "y")
    assert patches.lines() == ["  [cpu] Target.x -> 2: because", "  [align] Target.y added: because too"]
    with pytest.raises(ValueError, match="patch kind"):
        patches.note("whatever", "a", "b")


def _openai_key_set(width: int, layers: int) -> set[str]:
    """The OpenAI CLIP state-dict keys of a ViT CLIP, written out from its published layout
    (independent of open_clip), plus the official adapter's keys per block."""
    keys = {
        "positional_embedding",
        "text_projection",
        "logit_scale",
        "token_embedding.weight",
        "ln_final.weight",
        "ln_final.bias",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.proj",
        "visual.conv1.weight",
        "visual.ln_pre.weight",
        "visual.ln_pre.bias",
        "visual.ln_post.weight",
        "visual.ln_post.bias",
    }
    block = [
        "ln_1.weight",
        "ln_1.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
        "adaptmlp.down_proj.weight",
        "adaptmlp.down_proj.bias",
        "adaptmlp.up_proj.weight",
        "adaptmlp.up_proj.bias",
    ]
    for tower in ("visual.transformer", "transformer"):
        keys |= {f"{tower}.resblocks.{i}.{k}" for i in range(layers) for k in block}
    return keys


def test_weight_mapping_of_a_tiny_random_model():
    from dmnsp.model import create_clip

    torch.set_num_threads(1)
    model = create_clip("dmnsp-tiny", None, adapter_dim=8, seed=3).model
    state = model.state_dict()
    mapped = pc.to_official_layout(state, {"down": "adaptmlp.down_proj", "up": "adaptmlp.up_proj"})
    assert set(mapped) == _openai_key_set(64, 12)
    # values travel unchanged, each to its own place
    assert (
        mapped["visual.transformer.resblocks.3.attn.in_proj_weight"]
        is state["visual.transformer.resblocks.3.block.attn.in_proj_weight"]
    )
    assert (
        mapped["transformer.resblocks.11.adaptmlp.down_proj.weight"]
        is state["transformer.resblocks.11.adapter.down.weight"]
    )
    assert mapped["visual.proj"] is state["visual.proj"]
    with pytest.raises(KeyError, match="no official name for adapter module 'up.weight'"):
        pc.to_official_layout(state, {"down": "adaptmlp.down_proj"})


def test_load_checked_refuses_an_incomplete_mapping():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    good = {"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}
    pc.load_checked(net, good, lambda k: False)
    assert torch.equal(net[0].weight, torch.ones(2, 2))
    with pytest.raises(pc.ParityError, match="unexpected"):
        pc.load_checked(net, {**good, "1.weight": torch.ones(1)}, lambda k: False)
    with pytest.raises(pc.ParityError, match="missing"):
        pc.load_checked(net, {"0.weight": torch.ones(2, 2)}, lambda k: False)
    pc.load_checked(net, {"0.weight": torch.ones(2, 2)}, lambda k: k == "0.bias")


def test_task_series_is_the_scenario_surface_of_the_official_loops():
    base = [(f"img{i}", i % 3) for i in range(9)]
    tasks = [
        pc.TaskImages(base, [0, 3], {0: 0, 1: 1, 2: 2}, lambda x: x.upper(), 0),
        pc.TaskImages(base, [1, 4, 7], {0: 0, 1: 1, 2: 2}, lambda x: x.upper(), 1),
    ]
    series = pc.TaskSeries(tasks)
    assert len(series) == 2 and list(series) == tasks
    assert series[1][2] == ("IMG7", 1, 1)
    both = series[0:2]
    assert len(both) == 5 and both[2] == ("IMG1", 1, 1)
    assert len(series[1:2]) == 3


def test_captured_locals_sees_a_functions_locals_on_return():
    def f(n):
        secret = [n, n * 2]
        return len(secret)

    seen: list[dict] = []
    with pc.captured_locals(f.__code__, seen):
        f(3)
        f(4)
    assert [d["secret"] for d in seen] == [[3, 6], [4, 8]]
    f(5)
    assert len(seen) == 2


def test_weight_mapping_prefixes_respect_dots_and_length():
    state = {
        "visual.transformer.resblocks.2.adapter.experts.1.up.weight": 1,
        "visual.transformer.resblocks.2.adapter.router": 2,
        "transformer.resblocks.0.adapter.experts.10.down.bias": 3,
        "transformer.resblocks.0.block.ln_1.weight": 4,
    }
    names = {
        "experts.1": "wrong_if_used_for_10",
        "experts.1.up": "adaptmlp_list.1.up_proj",
        "experts.10.down": "adaptmlp_list.10.down_proj",
        "router": "router_list.0",
    }
    assert pc.to_official_layout(state, names) == {
        "visual.transformer.resblocks.2.adaptmlp_list.1.up_proj.weight": 1,
        "visual.transformer.resblocks.2.router_list.0": 2,
        "transformer.resblocks.0.adaptmlp_list.10.down_proj.bias": 3,
        "transformer.resblocks.0.ln_1.weight": 4,
    }


@pytest.mark.parametrize("scale", [100.0, 14.285714149475098, 30.0])
def test_exact_log_is_the_float32_whose_exp_is_closest(scale):
    x = pc.exact_log(scale)
    assert x.dtype == torch.float32

    def gap(y):
        return abs(float(torch.exp(y)) - scale)

    for direction in (float("inf"), float("-inf")):
        neighbour = torch.nextafter(x, torch.tensor(direction))
        assert gap(x) <= gap(neighbour)
    assert gap(x) <= 1e-6 * scale


def test_loader_factory_seeds_like_the_project():
    from dmnsp.loaders import derive_seed

    data = list(range(10))
    state = {"task": 2}
    factory = pc.LoaderFactory(7, state, ["loader", "basis"])
    first = factory(data, batch_size=4, shuffle=True, num_workers=8)
    second = factory(data, batch_size=4, shuffle=True, num_workers=8)
    third = factory(data, batch_size=4, shuffle=True)
    assert first.num_workers == 0  # one process: crops stay in the global stream
    assert first.generator.initial_seed() == derive_seed(7, 2, "loader")
    assert second.generator.initial_seed() == derive_seed(7, 2, "basis")
    assert third.generator.initial_seed() == derive_seed(7, 2, "basis")  # the last purpose repeats
    state["task"] = 3
    assert factory(data, batch_size=4).generator.initial_seed() == derive_seed(7, 3, "loader")
    # the same permutation as the project's own loader with that seed
    from dmnsp.loaders import make_loader

    ours = make_loader(data, 4, shuffle=True, seed=derive_seed(7, 2, "loader"), device=torch.device("cpu"))
    again = pc.LoaderFactory(7, {"task": 2}, ["loader"])(data, batch_size=4, shuffle=True)
    assert [b.tolist() for b in ours] == [b.tolist() for b in again]


def test_loader_factory_reseeds_the_global_stream_for_evaluation():
    from dmnsp.loaders import derive_seed

    pc.LoaderFactory(1, {"task": 4}, ["eval"], reseed="eval")(list(range(3)), batch_size=2)
    after = torch.rand(3)
    torch.manual_seed(derive_seed(1, 4, "eval"))
    assert torch.equal(after, torch.rand(3))


def test_seeds_summary_compares_avg_and_last_over_seeds():
    import parity

    def rows(ours, official):
        return [{"acc_ours": a, "acc_official": b} for a, b in zip(ours, official, strict=True)]

    results = {
        "seeds": {
            0: {"rows": rows([1.0, 0.5], [1.0, 0.4])},  # Avg 0.75 / 0.70, Last 0.5 / 0.4
            1: {"rows": rows([0.8, 0.6], [0.9, 0.6])},  # Avg 0.70 / 0.75, Last 0.6 / 0.6
        }
    }
    text = "\n".join(parity.seeds_summary(results))
    assert "over 2 seed(s)" in text
    assert "ours     Avg 0.7250 (0.7000-0.7500), Last 0.5500 (0.5000-0.6000)" in text
    assert "official Avg 0.7250 (0.7000-0.7500), Last 0.5000 (0.4000-0.6000)" in text
    assert "Avg +0.0500, -0.0500; Last +0.1000, +0.0000" in text


def test_logit_scale_alignment_is_checked_after_the_fact():
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(14.2857))))
    patches = pc.Patches()
    pc.align_logit_scale(model, 100.0, patches)
    pc.check_logit_scale(model, 100.0)
    assert "log(100)" in patches.lines()[0]
    model.logit_scale.data.fill_(float(np.log(14.2857)))  # e.g. a weight load after the patch
    with pytest.raises(pc.ParityError, match="logit scale is 14.28"):
        pc.check_logit_scale(model, 100.0)
    same = pc.Patches()
    pc.align_logit_scale(model, float(model.logit_scale.detach().exp()), same)
    assert same.items == []  # nothing to align, nothing listed
