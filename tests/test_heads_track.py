"""Track head: names/shapes as upstream, output contract, correlation/sampling conventions, precision."""
import json
import math

import pytest
import torch

from vggt_fsdp.model.heads.track import TrackHead
from vggt_fsdp.model.heads.track_blocks import AttnBlock
from vggt_fsdp.model.heads.track_corr import CorrelationLookup, feature_pyramid, sample_features4d
from vggt_fsdp.model.heads.track_embed import displacement_embedding, grid_sincos_embedding

DIM, PATCH, SPECIAL = 32, 14, 5
TINY = dict(features=16, iters=2, corr_levels=2, corr_radius=1, hidden_size=32,
            out_channels=(8, 16, 32, 32), intermediate_layer_idx=(0, 1, 2, 3))


def tiny_inputs(batch=1, frames=3, height=42, width=56, num_points=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    patches = (height // PATCH) * (width // PATCH)
    tokens = [torch.randn(batch, frames, SPECIAL + patches, DIM, generator=gen) for _ in range(4)]
    images = torch.rand(batch, frames, 3, height, width, generator=gen)
    queries = torch.rand(batch, num_points, 2, generator=gen) * torch.tensor([width - 1.0, height - 1.0])
    return tokens, images, queries


def tiny_head(**kwargs):
    torch.manual_seed(0)
    return TrackHead(DIM, **{**TINY, **kwargs})


def test_vggt_1b_names_shapes_and_count_match_manifest(fixtures_dir):
    manifest = json.loads((fixtures_dir / "vggt_1b_state_dict.json").read_text())["tensors"]
    expected = {k[len("track_head."):]: v for k, v in manifest.items() if k.startswith("track_head.")}
    with torch.device("meta"):
        head = TrackHead(2048)
    assert {k: list(v.shape) for k, v in head.state_dict().items()} == expected
    assert "tracker.updateformer.virual_tracks" in expected  # upstream's spelling, kept
    assert sum(p.numel() for p in head.parameters()) == sum(math.prod(s) for s in expected.values())


@pytest.mark.parametrize("height,width", [(42, 56), (70, 42)])
def test_output_contract(height, width):
    head = tiny_head()
    tokens, images, queries = tiny_inputs(batch=2, frames=3, height=height, width=width, num_points=4)
    tracks, vis, conf = head(tokens, images, SPECIAL, query_points=queries)
    assert len(tracks) == TINY["iters"]
    assert all(t.shape == (2, 3, 4, 2) for t in tracks)
    assert vis.shape == conf.shape == (2, 3, 4)
    assert torch.all((vis > 0) & (vis < 1)) and torch.all((conf > 0) & (conf < 1))
    # The query frame's positions are the query points themselves, in image pixels.
    for t in tracks:
        torch.testing.assert_close(t[:, 0], queries)
    assert len(head(tokens, images, SPECIAL, query_points=queries, iters=3)[0]) == 3


def test_without_confidence():
    head = tiny_head(predict_conf=False)
    assert not any(name.startswith("tracker.conf_predictor") for name in head.state_dict())
    tokens, images, queries = tiny_inputs()
    _, _, conf = head(tokens, images, SPECIAL, query_points=queries)
    assert conf is None


def test_query_points_are_required():
    tokens, images, _ = tiny_inputs()
    with pytest.raises(ValueError, match="query_points"):
        tiny_head()(tokens, images, SPECIAL)


def test_gradients_reach_tracker_and_feature_extractor():
    head = tiny_head()
    tokens, images, queries = tiny_inputs()
    tracks, vis, conf = head(tokens, images, SPECIAL, query_points=queries)
    (tracks[-1].square().mean() + vis.mean() + conf.mean()).backward()
    for name in ("tracker.corr_mlp.fc1.weight", "tracker.updateformer.virual_tracks",
                 "feature_extractor.projects.0.weight", "feature_extractor.scratch.output_conv1.weight"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_follows_surrounding_autocast():
    head = tiny_head()
    tokens, images, queries = tiny_inputs()
    dtypes = []
    head.tracker.updateformer.input_transform.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracks, vis, _ = head(tokens, images, SPECIAL, query_points=queries)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert torch.isfinite(tracks[-1]).all() and torch.isfinite(vis).all()


def test_sample_features_at_pixels_and_detached_coords():
    fmap = torch.randn(2, 3, 5, 7)
    coords = torch.tensor([[[0.0, 0.0], [6.0, 4.0]], [[3.0, 2.0], [2.5, 1.0]]], requires_grad=True)
    feats = sample_features4d(fmap, coords)
    assert feats.shape == (2, 2, 3)
    torch.testing.assert_close(feats[0, 1], fmap[0, :, 4, 6])  # (x=6, y=4) -> row 4, column 6
    torch.testing.assert_close(feats[1, 1], (fmap[1, :, 1, 2] + fmap[1, :, 1, 3]) / 2)
    assert not feats.requires_grad  # lookups never differentiate through positions, as upstream


def test_correlation_window_convention():
    radius, channels = 1, 4
    fmaps = torch.randn(1, 1, channels, 6, 8)
    target = torch.randn(1, 1, 1, channels)
    x0, y0 = 3.0, 2.0
    window = CorrelationLookup(radius)(feature_pyramid(fmaps, 2), target, torch.tensor([[[[x0, y0]]]]))
    assert window.shape == (1, 1, 1, 2 * (2 * radius + 1) ** 2)
    corr = torch.einsum("c,chw->hw", target.flatten(), fmaps[0, 0]) / math.sqrt(channels)
    level0 = window[0, 0, 0, :9].view(3, 3)
    # Upstream's offset grid puts the x offset on the window's first axis, the y offset on its second.
    for a in range(3):
        for b in range(3):
            torch.testing.assert_close(level0[a, b], corr[int(y0) + b - radius, int(x0) + a - radius])
    # Level 1 is the 2x average-pooled map, looked up at coords / 2.
    pooled = torch.nn.functional.avg_pool2d(fmaps[0], 2)[0]
    corr1 = torch.einsum("c,chw->hw", target.flatten(), pooled) / math.sqrt(channels)
    torch.testing.assert_close(window[0, 0, 0, 9:].view(3, 3)[1, 1], (corr1[1, 1] + corr1[1, 2]) / 2)


def test_embeddings():
    xy = torch.tensor([[[0.7, -1.3]]])
    emb = displacement_embedding(xy, 4)
    freqs = torch.tensor([0.0, 2.0]) * (1000.0 / 4)
    expected = torch.stack([torch.sin(0.7 * freqs[0]), torch.cos(0.7 * freqs[0]),
                            torch.sin(0.7 * freqs[1]), torch.cos(0.7 * freqs[1]),
                            torch.sin(-1.3 * freqs[0]), torch.cos(-1.3 * freqs[0]),
                            torch.sin(-1.3 * freqs[1]), torch.cos(-1.3 * freqs[1])])
    torch.testing.assert_close(emb.flatten(), expected)
    grid = grid_sincos_embedding(8, height=3, width=5)
    assert grid.shape == (1, 8, 3, 5)
    # First half: x (column) as [sin(x), sin(x/100), cos(x), cos(x/100)]; second half: y (row).
    torch.testing.assert_close(grid[0, :4, 2, 4], torch.tensor([math.sin(4), math.sin(0.04), math.cos(4), math.cos(0.04)]))
    torch.testing.assert_close(grid[0, 4:, 2, 4], torch.tensor([math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]))


def test_attn_block_residual_is_on_the_normalised_input():
    # Upstream's blocks normalise first and add the residual to the normalised tokens.
    block = AttnBlock(8, num_heads=2)
    torch.nn.init.zeros_(block.attn.out_proj.weight)
    torch.nn.init.zeros_(block.mlp.fc2.weight)
    torch.nn.init.zeros_(block.mlp.fc2.bias)
    x = torch.randn(3, 4, 8) * 5 + 2
    torch.testing.assert_close(block(x), block.norm1(x))


# ---------------------------------------------------------------------------------- recompute (issue 13)
def _preset_head(preset: str, chunk: int | None):
    from vggt_fsdp.model.config import get_preset

    cfg = get_preset(preset)
    t, d = cfg.track_head, cfg.dpt_head
    torch.manual_seed(0)
    head = TrackHead(cfg.token_dim, features=t.features, iters=t.iters, corr_levels=t.corr_levels,
                     corr_radius=t.corr_radius, hidden_size=t.hidden_size, out_channels=d.out_channels,
                     intermediate_layer_idx=d.intermediate_layer_idx, frames_chunk_size=chunk)
    return cfg, head


def _run(head, cfg, scenes=2, frames=3, height=42, width=56, points=5):
    gen = torch.Generator().manual_seed(1)
    patches = (height // PATCH) * (width // PATCH)
    tokens = [torch.randn(scenes, frames, SPECIAL + patches, cfg.token_dim, generator=gen, requires_grad=True)
              for _ in range(cfg.aggregator.depth)]
    images = torch.rand(scenes, frames, 3, height, width, generator=gen)
    queries = torch.rand(scenes, points, 2, generator=gen) * torch.tensor([width - 1.0, height - 1.0])
    tracks, vis, conf = head(tokens, images, SPECIAL, query_points=queries, apply_sigmoid=False)
    outputs = [*tracks, vis, conf]
    weights = torch.Generator().manual_seed(2)
    sum((o * torch.randn(o.shape, generator=weights)).sum() for o in outputs).backward()
    grads = {n: p.grad for n, p in head.named_parameters()}
    grads.update({f"token layer {i}": t.grad for i, t in enumerate(tokens) if t.grad is not None})
    return [o.detach() for o in outputs], grads


@pytest.mark.parametrize("preset", ["vggt-tiny", "vggt-mid"])
def test_chunked_recompute_equals_the_plain_head(preset):
    """Frames in chunks of 2 with checkpointing (feature extractor per chunk, each iteration's update, the
    correlation volumes per chunk) against all frames at once without: outputs to 1e-6 and gradients to
    1e-5 relative, fp32; the same parameters receive gradients."""
    cfg, plain = _preset_head(preset, chunk=None)
    _, chunked = _preset_head(preset, chunk=2)
    chunked.checkpoint_chunks = True
    assert chunked.feature_extractor.checkpoint_chunks and chunked.tracker.checkpoint_chunks
    out_plain, grads_plain = _run(plain, cfg)
    out_chunked, grads_chunked = _run(chunked, cfg)
    for a, b in zip(out_plain, out_chunked):
        assert (a - b).abs().max() <= 1e-6 * a.abs().max()
    assert {n for n, g in grads_plain.items() if g is not None} == {n for n, g in grads_chunked.items() if g is not None}
    for name, grad in grads_plain.items():
        if grad is not None:
            assert (grad - grads_chunked[name]).norm() <= 1e-5 * grad.norm(), name


def test_chunked_recompute_keeps_less():
    from vggt_fsdp.memory.accounting import count_saved_bytes

    cfg, head = _preset_head("vggt-tiny", chunk=2)
    saved = {}
    for on in (False, True):
        head.checkpoint_chunks = on
        saved[on], _ = count_saved_bytes(lambda: _run_forward(head, cfg))
    assert saved[True].total_bytes < saved[False].total_bytes / 5


def _run_forward(head, cfg):
    tokens = [torch.randn(2, 3, SPECIAL + 12, cfg.token_dim, requires_grad=True) for _ in range(cfg.aggregator.depth)]
    return head(tokens, torch.rand(2, 3, 3, 42, 56), SPECIAL, query_points=torch.rand(2, 5, 2) * 40)


def test_bf16_parameters_under_cpu_autocast():
    # As FSDP2 trains it: bf16 parameters under bf16 autocast. The update transformer's input mixes fp32
    # embeddings with bf16 features; a bf16 LayerNorm on the CPU refuses an fp32 input.
    head = tiny_head().to(torch.bfloat16)
    tokens, images, queries = tiny_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracks, vis, conf = head([t.bfloat16() for t in tokens], images, SPECIAL, query_points=queries)
    (tracks[-1].float().mean() + vis.float().mean()).backward()
    assert torch.isfinite(tracks[-1]).all() and head.tracker.corr_mlp.fc1.weight.grad is not None


def test_logits_are_the_probabilities_before_the_sigmoid():
    head = tiny_head()
    tokens, images, queries = tiny_inputs()
    _, vis, conf = head(tokens, images, SPECIAL, query_points=queries)
    _, vis_logits, conf_logits = head(tokens, images, SPECIAL, query_points=queries, apply_sigmoid=False)
    torch.testing.assert_close(torch.sigmoid(vis_logits), vis)
    torch.testing.assert_close(torch.sigmoid(conf_logits), conf)
