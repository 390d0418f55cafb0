"""The VGGT model: parity with the reference fixture, manifest, meta build, weights, configurability."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from vggt_fsdp import cli
from vggt_fsdp.commands.parity import run_parity
from vggt_fsdp.model import (VGGT, VGGTConfig, WeightsMismatchError, build_model, get_preset, init_weights,
                             load_weights, materialize, save_weights)


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    root = fixtures_dir / "vggt_tiny"
    return root, VGGTConfig.from_fixture(root), load_file(str(root / "io.safetensors"))


def _fixture_model(root, config: VGGTConfig, **load_kw) -> VGGT:
    model = VGGT(config)
    load_weights(model, root / "weights.safetensors", **load_kw)
    return model.eval()


# ---------------------------------------------------------------------------------- parity
def test_parity_command_passes_on_fixture(fixture, capsys):
    root, _, io = fixture
    assert cli.main(["parity", str(root)]) == 0
    printed = capsys.readouterr().out
    for key in io:
        if key.startswith("eval."):
            assert f"eval {key[5:]} " in printed, f"parity does not report {key}"
    assert "train loss" in printed and "gradients" in printed


def test_parity_fails_for_wrong_weights_and_rejects_non_fixture(fixture, tmp_path, capsys):
    root, _, _ = fixture
    assert cli.main(["parity", str(tmp_path)]) == 2
    assert "not a parity fixture" in capsys.readouterr().err
    for name in ("config.json", "io.safetensors"):
        shutil.copy(root / name, tmp_path / name)
    weights = load_file(str(root / "weights.safetensors"))
    weights["aggregator.global_blocks.1.mlp.fc2.bias"] += 0.05
    save_file(weights, str(tmp_path / "weights.safetensors"))
    checks = run_parity(tmp_path)
    failed = {c.name for c in checks if not c.passed}
    assert "eval aggregator.tokens_last" in failed and "eval depth" in failed
    assert "eval aggregator.tokens_first" not in failed  # layer 0 precedes the perturbed block
    assert cli.main(["parity", str(tmp_path)]) == 1


# ---------------------------------------------------------------------------------- manifest / meta
def test_summary_json_equals_manifest_built_on_meta(fixtures_dir, capsys):
    manifest = json.loads((fixtures_dir / "vggt_1b_state_dict.json").read_text())
    start = time.perf_counter()
    assert cli.main(["summary", "vggt-1b", "--json"]) == 0
    elapsed = time.perf_counter() - start
    data = json.loads(capsys.readouterr().out)
    assert data["num_parameters"] == manifest["num_parameters"] == 1_256_537_516
    assert data["tensors"] == manifest["tensors"]
    assert elapsed < 10, f"summary of vggt-1b took {elapsed:.1f}s; the meta build should take ~1s"
    model = build_model(get_preset("vggt-1b"), device="meta")
    assert sorted(n for n, p in model.named_parameters() if not p.requires_grad) == manifest["trainable_false"]
    assert list(model.buffers(recurse=True)) and not any(
        name in model.state_dict() for name, _ in model.named_buffers()), "buffers must be non-persistent"


def test_summary_text_counts_add_up(capsys):
    assert cli.main(["summary", "vggt-tiny", "--disable", "track"]) == 0
    lines = capsys.readouterr().out.splitlines()
    total = int(lines[0].split(":")[1].split("parameters")[0].replace(",", ""))
    parts = [int(line.split()[-2].replace(",", "")) for line in lines[1:]]
    assert sum(parts) == total == sum(p.numel() for p in VGGT(get_preset("vggt-tiny").replace(enable_track=False)).parameters())
    assert not any("track_head" in line for line in lines)


def test_meta_build_then_materialize_initialises_everything():
    config = get_preset("vggt-tiny")
    model = build_model(config, device="meta")
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    materialize(model, "cpu")
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    agg = model.aggregator
    assert torch.equal(agg._resnet_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.equal(agg._resnet_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert torch.all(agg.frame_blocks[0].ls1.gamma == config.aggregator.init_values)
    assert torch.all(agg.patch_embed.blocks[0].ls2.gamma == config.patch_embed.init_values)
    assert 0 < agg.camera_token.abs().max() < 1e-4  # normal(std 1e-6)
    assert 0.01 < agg.patch_embed.pos_embed.std() < 0.03  # trunc_normal(std 0.02)
    assert torch.all(agg.patch_embed.mask_token == 0) and not agg.patch_embed.mask_token.requires_grad
    assert torch.all(model.camera_head.empty_pose_tokens == 0)
    out = model.eval()(torch.rand(1, 2, 3, 28, 42), query_points=torch.rand(1, 3, 2) * 28)
    assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v))


def test_init_weights_refuses_parameters_without_an_init_rule():
    model = build_model(get_preset("vggt-tiny").replace(enable_track=False), device="meta")
    model.camera_head.trunk[0].extra = torch.nn.Module()
    model.camera_head.trunk[0].extra.orphan = torch.nn.Parameter(torch.empty(3, device="meta"))
    model.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="orphan"):
        init_weights(model)


# ---------------------------------------------------------------------------------- weights
def test_load_weights_formats_and_save_roundtrip(fixture, tmp_path):
    root, config, _ = fixture
    reference = _fixture_model(root, config).state_dict()
    torch.save(reference, tmp_path / "raw.pt")
    torch.save({"model": reference, "steps": 3}, tmp_path / "wrapped.pt")
    save_weights(_fixture_model(root, config), tmp_path / "out.safetensors")
    assert set(load_file(str(tmp_path / "out.safetensors"))) == set(reference)
    for name in ("raw.pt", "wrapped.pt", "out.safetensors"):
        model = VGGT(config)
        report = load_weights(model, tmp_path / name)
        assert report.ok and not report.ignored
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in reference.items()), name
    with pytest.raises(ValueError, match="suffix"):
        (tmp_path / "x.ckpt").write_bytes(b"")
        load_weights(VGGT(config), tmp_path / "x.ckpt")


def test_strict_load_lists_missing_unexpected_and_misshapen(fixture, tmp_path):
    root, config, _ = fixture
    sd = load_file(str(root / "weights.safetensors"))
    dropped = sorted(k for k in sd if k.startswith("aggregator.frame_blocks.0."))
    for k in dropped:
        del sd[k]
    sd["aggregator.extra_token"] = torch.zeros(2)
    sd["camera_head.embed_pose.bias"] = torch.zeros(7)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    model = VGGT(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(model, tmp_path / "bad.safetensors")
    message, report = str(err.value), err.value.report
    assert sorted(report.missing) == dropped
    assert f"{len(dropped)} missing: {report.missing[0]}, " in message and f"({len(dropped) - 5} more)" in message
    assert "1 unexpected: aggregator.extra_token" in message
    assert "1 wrongly shaped: camera_head.embed_pose.bias: checkpoint (7,) vs model (128,)" in message
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "strict failure must not load"
    report = load_weights(model, tmp_path / "bad.safetensors", strict=False)
    assert report.unexpected == ["aggregator.extra_token"] and len(report.mismatched) == 1
    assert torch.equal(model.state_dict()["aggregator.frame_blocks.1.mlp.fc1.weight"], sd["aggregator.frame_blocks.1.mlp.fc1.weight"])


def test_disabled_heads_are_absent_and_their_keys_ignored_only_on_request(fixture, tmp_path):
    root, config, io = fixture
    config = config.replace(enable_point=False, enable_track=False)
    model = VGGT(config)
    assert not any(k.startswith(("point_head.", "track_head.")) for k in model.state_dict())
    with pytest.raises(WeightsMismatchError, match="ignore_disabled_heads=True"):
        load_weights(model, root / "weights.safetensors")
    report = load_weights(model, root / "weights.safetensors", ignore_disabled_heads=True)
    assert report.ok and report.ignored and all(k.startswith(("point_head.", "track_head.")) for k in report.ignored)
    with torch.no_grad():
        out = model.eval()(io["input.images"], query_points=io["input.query_points"])
    assert set(out) == {"pose_enc", "pose_enc_list", "depth", "depth_conf", "images"}
    for key in ("pose_enc", "depth", "depth_conf"):
        ref = io[f"eval.{key}"]
        assert (out[key] - ref).abs().max() <= 1e-4 * ref.abs().max()
    # ignore_disabled_heads drops only keys of disabled heads, nothing else.
    model = VGGT(config.replace(enable_point=True))
    sd = {k: v for k, v in load_file(str(root / "weights.safetensors")).items() if not k.startswith("point_head.")}
    sd["aggregator.bogus"] = torch.zeros(1)
    with pytest.raises(WeightsMismatchError, match="unexpected: aggregator.bogus"):
        load_weights(model, _save(sd, tmp_path / "extra.safetensors"), ignore_disabled_heads=True)


def _save(state_dict, path):
    save_file(state_dict, str(path))
    return path
