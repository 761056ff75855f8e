"""open_clip models with adapters: identity at init, parameter counts, weight resolution errors."""

from __future__ import annotations

import time

import open_clip
import pytest
import torch

from dmnsp import model as dm
from dmnsp.adapters import AdaptedBlock, count_trainable
from dmnsp.model import ModelError, WeightsError, create_clip


def _logits(model, images, tokens):
    model.eval()
    with torch.no_grad():
        return dm.clip_logits(dm.encode_image(model, images), dm.encode_text(model, tokens), 100.0)


def test_adapters_at_init_equal_plain_zero_shot():
    dm.register_package_models()
    torch.manual_seed(3)
    plain = open_clip.create_model("dmnsp-tiny", pretrained=None)
    ours = create_clip("dmnsp-tiny", None, seed=3, adapter_dim=16).model
    tokens = open_clip.get_tokenizer("dmnsp-tiny")(["a bad photo of a shirt.", "a bad photo of a bag."])
    images = torch.randn(4, 3, 28, 28)
    # Adding the zero adapter output changes tensor layouts, so BLAS may sum in another order:
    # equal up to float rounding (scale-100 logits, 1e-6 relative).
    assert torch.allclose(_logits(ours, images, tokens), _logits(plain, images, tokens), rtol=1e-6, atol=1e-3)
    assert not torch.allclose(
        _logits(ours, images, tokens), _logits(plain, images, tokens.flip(0)), atol=1e-3
    )
    # Train mode too (adapter dropout acts on a zero-initialised up projection).
    ours.train()
    plain.train()
    torch.manual_seed(0)
    a = dm.encode_image(ours, images)
    torch.manual_seed(0)
    b = dm.encode_image(plain, images)
    assert torch.equal(a, b)


def test_only_adapters_train_and_every_block_wrapped():
    m = create_clip("dmnsp-tiny", None, adapter_dim=64).model
    assert len(m.visual.transformer.resblocks) == 12 and len(m.transformer.resblocks) == 12
    assert all(isinstance(b, AdaptedBlock) for b in m.visual.transformer.resblocks)
    assert all(isinstance(b, AdaptedBlock) for b in m.transformer.resblocks)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert not m.logit_scale.requires_grad
    assert count_trainable(m) == {"visual": 12 * (64 * 64 + 64 + 64 * 64 + 64)} | {"text": 12 * 8320}


def test_vit_b16_adapter_parameter_count():
    m = create_clip("ViT-B-16", None, adapter_dim=64).model
    assert count_trainable(m) == {"visual": 1_189_632, "text": 793_344}


def test_grad_checkpointing_keeps_block_signature():
    m = create_clip("dmnsp-tiny", None, adapter_dim=8).model
    m.set_grad_checkpointing(True)
    m.train()
    out = (
        dm.encode_image(m, torch.randn(2, 3, 28, 28)).sum()
        + dm.encode_text(m, open_clip.get_tokenizer("dmnsp-tiny")(["x"])).sum()
    )
    out.backward()
    assert m.visual.transformer.resblocks[0].adapter.down.weight.grad is not None


def test_unknown_model_name_suggests_alternatives():
    with pytest.raises(ModelError, match="unknown model_name 'ViT-B/16'.*ViT-B-16"):
        create_clip("ViT-B/16", None)


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ModelError, match="unknown pretrained tag 'nope'.*openai"):
        dm.resolve_weights("ViT-B-16", "nope")


def test_missing_weights_offline_fail_fast(monkeypatch, tmp_path):
    monkeypatch.setattr(dm, "_network_available", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="not in the cache.*cache_dir.*local"):
        create_clip("ViT-B-16", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 10


def test_missing_local_file_and_corrupt_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_clip("dmnsp-tiny", str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not load weights"):
        create_clip("dmnsp-tiny", str(bad))


def test_local_checkpoint_round_trip(tmp_path):
    src = create_clip("dmnsp-tiny", None, seed=5, adapter_dim=None).model
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    loaded = create_clip("dmnsp-tiny", str(path), seed=99, adapter_dim=None).model
    for (k, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_gpu_requested_but_absent():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the missing-GPU error cannot be provoked")
    with pytest.raises(ModelError, match="CUDA is not available"):
        dm.resolve_device("cuda")


def test_logit_scale_is_the_checkpoints_own_or_a_constant(tmp_path):
    src = create_clip("dmnsp-tiny", None, seed=5, adapter_dim=None).model
    with torch.no_grad():
        src.logit_scale.fill_(2.6612)  # a self-pretrained model's value: exp = 14.31
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    model = create_clip("dmnsp-tiny", str(path), seed=1, adapter_dim=8).model
    got = dm.logit_scale(model, "checkpoint")
    # exp of the stored float32 parameter, in float32 (what the reference's forward computes).
    assert got.dtype == torch.float32 and torch.equal(
        got, torch.exp(torch.tensor(2.6612, dtype=torch.float32))
    )
    assert float(got) == pytest.approx(14.31, abs=0.01)
    assert torch.equal(dm.logit_scale(model, 100.0), torch.tensor(100.0))
    assert torch.equal(dm.logit_scale(model, 100), torch.tensor(100.0))
    # Random init: CLIP's 1/0.07.
    assert float(dm.logit_scale(create_clip("dmnsp-tiny", None, adapter_dim=8).model, "checkpoint")) == (
        pytest.approx(1 / 0.07, rel=1e-6)
    )
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert torch.equal(dm.clip_logits(img, txt, got), (got * img) @ txt.t())


def test_logit_scale_order_and_basis_batch_keys_resolve_by_mode_and_label_the_run():
    from dmnsp.config import ConfigError, config_hash, validate
    from dmnsp.methods import run_label

    base = {"model_name": "dmnsp-tiny", "pretrained": None}
    faithful = validate(base)
    clean = validate({**base, "projection": {"mode": "clean"}})
    assert faithful["logit_scale"] == "checkpoint" and clean["logit_scale"] == 100.0
    assert faithful["projection"]["order"] == "reference" and clean["projection"]["order"] == "composite"
    assert faithful["projection"]["basis_batch"] == clean["projection"]["basis_batch"] == 128
    assert run_label(faithful) == "dmnsp" and run_label(clean) == "dmnsp (mode=clean)"
    # 100 and 100.0 are one setting (one config hash); off the mode's choice they name the run.
    a, b = validate({**base, "logit_scale": 100}), validate({**base, "logit_scale": 100.0})
    assert a["logit_scale"] == 100.0 and config_hash(a) == config_hash(b) != config_hash(faithful)
    assert run_label(a) == "dmnsp (logit_scale=100)"
    assert (
        run_label(validate({**base, "method": "finetune", "logit_scale": 100}))
        == "finetune (logit_scale=100)"
    )
    assert run_label(validate({**base, "method": "zeroshot", "logit_scale": 100})) == "zeroshot"  # argmax
    odd = validate({**base, "projection": {"order": "composite", "basis_batch": 64}})
    assert run_label(odd) == "dmnsp (order=composite, basis_batch=64)"
    for bad in ("foo", 0, -1.0, True):
        with pytest.raises(ConfigError, match="logit_scale"):
            validate({**base, "logit_scale": bad})
    with pytest.raises(ConfigError, match="basis_batch"):
        validate({**base, "projection": {"basis_batch": 0}})
