"""DPT head and head activations: names/shapes as upstream, chunking, chunk checkpointing, formulas."""
import json
import math

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from vggt_fsdp.model.heads.dpt import DPTHead, ResidualConvUnit
from vggt_fsdp.model.heads.head_act import activate_head, activate_pose, create_uv_grid, inverse_log_transform, \
    make_sincos_pos_embed, position_grid_to_embed

TINY = dict(features=16, out_channels=(8, 16, 32, 32), intermediate_layer_idx=(0, 1, 2, 3))
DIM, PATCH, SPECIAL = 32, 14, 5


def tokens_for(batch, frames, height, width, layers=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    patches = (height // PATCH) * (width // PATCH)
    return [torch.randn(batch, frames, SPECIAL + patches, DIM, generator=gen) for _ in range(layers)]


def tiny_head(**kwargs):
    torch.manual_seed(0)
    return DPTHead(DIM, **{**TINY, **kwargs})


@pytest.mark.parametrize("prefix,kwargs", [
    ("depth_head.", dict(output_dim=2, activation="exp")),
    ("point_head.", dict(output_dim=4, activation="inv_log")),
])
def test_vggt_1b_names_and_shapes_match_manifest(fixtures_dir, prefix, kwargs):
    manifest = json.loads((fixtures_dir / "vggt_1b_state_dict.json").read_text())["tensors"]
    expected = {k[len(prefix):]: v for k, v in manifest.items() if k.startswith(prefix)}
    with torch.device("meta"):
        head = DPTHead(2048, **kwargs)
    assert {k: list(v.shape) for k, v in head.state_dict().items()} == expected


@pytest.mark.parametrize("height,width", [(42, 56), (70, 42), (44, 59)])
def test_output_shapes_landscape_portrait_and_non_multiple(height, width):
    head = tiny_head(output_dim=4)
    images = torch.rand(2, 3, 3, height, width)
    values, conf = head(tokens_for(2, 3, height, width), images, SPECIAL)
    # Upstream predicts at the patch grid's size: the image size rounded down to the patch size.
    out_h, out_w = height // PATCH * PATCH, width // PATCH * PATCH
    assert values.shape == (2, 3, out_h, out_w, 3)
    assert conf.shape == (2, 3, out_h, out_w)
    assert torch.all(conf > 1)  # expp1


def test_feature_only_with_down_ratio():
    head = tiny_head(feature_only=True, down_ratio=2, pos_embed=False)
    feats = head(tokens_for(1, 3, 42, 56), torch.rand(1, 3, 3, 42, 56), SPECIAL)
    assert feats.shape == (1, 3, TINY["features"], 21, 28)
    assert not hasattr(head.scratch, "output_conv2")


def test_chunked_equals_unchunked():
    head = tiny_head(output_dim=2, activation="exp")
    tokens, images = tokens_for(1, 5, 42, 28), torch.rand(1, 5, 3, 42, 28)
    head.frames_chunk_size = None
    whole = head(tokens, images, SPECIAL)
    head.frames_chunk_size = 2  # chunks of 2, 2, 1 frames
    chunked = head(tokens, images, SPECIAL)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _run_with_saved_bytes(head, tokens, images):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        values, conf = head(tokens, images, SPECIAL)
    (values.square().mean() + conf.mean()).backward()
    return values, conf, sum(saved)


def test_checkpoint_chunks_same_outputs_and_grads_fewer_saved_bytes():
    images = torch.rand(1, 4, 3, 42, 56)
    results = {}
    for flag in (False, True):
        head = tiny_head(output_dim=4, frames_chunk_size=2)
        head.checkpoint_chunks = flag
        tokens = [t.requires_grad_() for t in tokens_for(1, 4, 42, 56)]
        values, conf, saved = _run_with_saved_bytes(head, tokens, images)
        grads = [p.grad for p in head.parameters()] + [t.grad for t in tokens]
        results[flag] = (values, conf, grads, saved)
    plain, ckpt = results[False], results[True]
    assert torch.equal(plain[0], ckpt[0]) and torch.equal(plain[1], ckpt[1])
    for g_plain, g_ckpt in zip(plain[2], ckpt[2]):
        torch.testing.assert_close(g_plain, g_ckpt, rtol=1e-5, atol=1e-7)
    # Checkpointed chunks keep only their inputs; without it every conv's input is saved.
    assert ckpt[3] < plain[3] / 10, (ckpt[3], plain[3])


def test_checkpoint_chunks_is_inactive_without_grad():
    head = tiny_head(output_dim=2, activation="exp")
    head.checkpoint_chunks = True
    with torch.no_grad():
        values, _ = head(tokens_for(1, 2, 28, 28), torch.rand(1, 2, 3, 28, 28), SPECIAL)
    assert values.shape == (1, 2, 28, 28, 1)


def test_bf16_tokens_computed_in_head_dtype():
    head = tiny_head(output_dim=2, activation="exp")
    tokens = tokens_for(1, 2, 28, 28)
    ref, _ = head(tokens, torch.rand(1, 2, 3, 28, 28), SPECIAL)
    out, _ = head([t.bfloat16() for t in tokens], torch.rand(1, 2, 3, 28, 28), SPECIAL)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_missing_layer_is_a_clear_error():
    head = tiny_head()
    tokens = tokens_for(1, 1, 28, 28)
    tokens[2] = None
    with pytest.raises(ValueError, match="layer 2"):
        head(tokens, torch.rand(1, 1, 3, 28, 28), SPECIAL)
    with pytest.raises(ValueError, match="only 2 layers"):
        head(tokens[:2], torch.rand(1, 1, 3, 28, 28), SPECIAL)


def test_unknown_activation_fails_at_construction():
    with pytest.raises(ValueError, match="valid choices"):
        DPTHead(DIM, activation="softplus", **TINY)
    with pytest.raises(ValueError, match="expp1"):
        DPTHead(DIM, conf_activation="exp1", **TINY)


def test_residual_unit_adds_the_activated_input():
    # Upstream's in-place ReLU makes the skip carry relu(x): with zero convs the unit is relu(x).
    unit = ResidualConvUnit(4)
    for p in unit.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(1, 4, 3, 3)
    assert torch.equal(unit(x), torch.relu(x))


def test_activation_formulas():
    raw = torch.tensor([[[[0.5]], [[-1.0]], [[2.0]], [[0.3]]]])  # (1, 4, 1, 1): 3 values + conf
    values, conf = activate_head(raw, "inv_log", "expp1")
    torch.testing.assert_close(values.flatten(), torch.tensor([math.e**0.5 - 1, -(math.e - 1), math.e**2 - 1]))
    torch.testing.assert_close(conf.flatten(), torch.tensor([1 + math.e**0.3]))
    values, conf = activate_head(raw, "exp", "expp0")
    torch.testing.assert_close(values.flatten(), torch.exp(torch.tensor([0.5, -1.0, 2.0])))
    torch.testing.assert_close(conf.flatten(), torch.tensor([math.e**0.3]))
    values, _ = activate_head(raw, "norm_exp", "sigmoid")
    xyz = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(values.flatten(), xyz / xyz.norm() * math.expm1(xyz.norm()))
    values, _ = activate_head(raw, "xy_inv_log", "sigmoid")
    z = math.e**2 - 1
    torch.testing.assert_close(values.flatten(), torch.tensor([0.5 * z, -z, z]))
    assert torch.equal(inverse_log_transform(torch.zeros(3)), torch.zeros(3))
    pose = torch.tensor([1.0, -2.0, 3.0, 0.1, 0.2, 0.3, 0.4, -0.5, 0.6])
    torch.testing.assert_close(activate_pose(pose, fl_act="relu")[7:], torch.tensor([0.0, 0.6]))
    with pytest.raises(ValueError, match="linear"):
        activate_pose(pose, trans_act="tanh")


def test_uv_grid_and_embedding():
    grid = create_uv_grid(4, 3, aspect_ratio=4 / 3)
    assert grid.shape == (3, 4, 2)
    span_x, span_y = 4 / 5, 3 / 5  # a 4:3 rectangle with unit diagonal
    torch.testing.assert_close(grid[0, 0], torch.tensor([-span_x * 3 / 4, -span_y * 2 / 3]))
    torch.testing.assert_close(grid[-1, -1], torch.tensor([span_x * 3 / 4, span_y * 2 / 3]))
    assert torch.all(grid[:, 1:, 0] > grid[:, :-1, 0]) and torch.all(grid[1:, :, 1] > grid[:-1, :, 1])
    embed = position_grid_to_embed(grid, 8)
    # channels: [sin(u), sin(u/10), cos(u), cos(u/10)] then the same for v (omega_0 = 100).
    u, v = grid[1, 2]
    expected = torch.stack([u.sin(), (u / 10).sin(), u.cos(), (u / 10).cos(),
                            v.sin(), (v / 10).sin(), v.cos(), (v / 10).cos()])
    torch.testing.assert_close(embed[1, 2], expected)


def test_sincos_embedding_is_computed_in_float64():
    # The reference computes these angles in float64; the fixture's outputs match bitwise only then.
    pos = torch.linspace(-0.8, 0.8, 37)
    omega = 1.0 / 100.0 ** (torch.arange(16, dtype=torch.float64) / 16)
    angles = pos.double()[:, None] * omega
    expected = torch.cat([angles.sin(), angles.cos()], dim=1).float()
    assert torch.equal(make_sincos_pos_embed(32, pos), expected)


@pytest.mark.parametrize("chunk", [None, 2])
def test_an_fsdp2_wrapped_head_returns_no_view_and_the_same_gradients(chunk, recwarn):
    """FSDP2 warned 4 times a `make run` that the wrapped DPT head "returned a view tensor ... can cause
    backward to fail or produce wrong gradients". The head now returns fresh tensors: no warning, and the
    sharded head's gradients equal the plain head's."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    from vggt_fsdp.memory.generic import _one_rank_group

    images = torch.rand(1, 3, 3, 42, 28)
    grads = {}
    for wrapped in (False, True):
        head = tiny_head(output_dim=4, activation="inv_log", frames_chunk_size=chunk)
        with _one_rank_group():
            if wrapped:
                fully_shard(head)
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                values, conf = head(tokens_for(1, 3, 42, 28), images, SPECIAL)
                assert not values._is_view() and not conf._is_view()
                (values.square().mean() + conf.mean()).backward()
            grads[wrapped] = [(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                              for p in head.parameters()]
    assert not [w for w in recwarn if "view tensor" in str(w.message)]
    for plain, sharded in zip(grads[False], grads[True]):
        torch.testing.assert_close(plain, sharded, rtol=0, atol=0)
