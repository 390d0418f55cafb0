"""Configurability of the model beyond the parity fixture, layer keeping, and the building blocks."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vggt_fsdp.model import VGGT, VGGTConfig, get_preset
from vggt_fsdp.model.aggregator import Aggregator
from vggt_fsdp.model.config import AggregatorConfig, DPTHeadConfig, PatchEmbedConfig
from vggt_fsdp.model.layers import Attention, RotaryPositionEmbedding2D, patch_positions


def small_config(**aggregator) -> VGGTConfig:
    """Fast config whose DPT layers (0, 2, 3, 5) leave aggregator layers 1 and 4 unread."""
    agg = dict(img_size=56, embed_dim=32, depth=6, num_heads=2)
    agg.update(aggregator)
    tiny = get_preset("vggt-tiny")
    return VGGTConfig(
        patch_embed=PatchEmbedConfig(depth=1, num_heads=2),
        aggregator=AggregatorConfig(**agg),
        camera_head=tiny.camera_head,
        dpt_head=DPTHeadConfig(features=8, out_channels=(8, 8, 16, 16), intermediate_layer_idx=(0, 2, 3, 5)),
        track_head=tiny.track_head,
    )


def make_model(config: VGGTConfig, seed: int = 0) -> VGGT:
    torch.manual_seed(seed)
    model = VGGT(config).eval()
    # Larger special tokens than the 1e-6 init so that "first frame vs others" is visible in outputs.
    with torch.no_grad():
        model.aggregator.camera_token.normal_(std=0.5)
        model.aggregator.register_token.normal_(std=0.5)
    return model


def assert_outputs_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    for key, ref in b.items():
        if torch.is_tensor(ref) and key != "images":
            assert (a[key] - ref).abs().max() <= tol * max(ref.abs().max(), 1), key


# ---------------------------------------------------------------------------------- config
def test_config_validation_names_the_bad_field():
    with pytest.raises(ValueError, match="aa_block_size=4"):
        small_config(aa_block_size=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        small_config(embed_dim=36, num_heads=6)
    with pytest.raises(ValueError, match="aa_order"):
        small_config(aa_order=("frame", "frame"))
    with pytest.raises(ValueError, match="intermediate_layer_idx contains 7"):
        small_config().replace(dpt_head=DPTHeadConfig(intermediate_layer_idx=(0, 1, 2, 7)))
    with pytest.raises(ValueError, match="valid choices: vggt-1b, vggt-mid, vggt-tiny"):
        get_preset("vggt-2b")
    with pytest.raises(ValueError, match="unknown key"):
        VGGTConfig.from_dict({"aggregator": {"depht": 3}})


def test_presets_and_config_roundtrip():
    assert 1_000_000 < sum(p.numel() for p in VGGT(get_preset("vggt-tiny")).parameters()) < 10_000_000
    for name in ("vggt-1b", "vggt-mid", "vggt-tiny"):
        cfg = get_preset(name)
        assert VGGTConfig.from_dict(cfg.to_dict()) == cfg
    assert get_preset("vggt-1b") == VGGTConfig()


# ---------------------------------------------------------------------------------- inputs
def test_four_dim_input_and_two_dim_query_points_mean_batch_one():
    model = make_model(get_preset("vggt-tiny"))
    images, queries = torch.rand(2, 3, 28, 42), torch.rand(4, 2) * 28
    with torch.no_grad():
        out4 = model(images, query_points=queries)
        out5 = model(images[None], query_points=queries[None])
    assert out4["depth"].shape == (1, 2, 28, 42, 1) and out4["track"].shape == (1, 2, 4, 2)
    assert_outputs_close(out4, out5, tol=0)


def test_batch_of_two_equals_two_batches_of_one():
    model = make_model(small_config())
    images, queries = torch.rand(2, 3, 3, 28, 42), torch.rand(2, 4, 2) * 28
    with torch.no_grad():
        both = model(images, query_points=queries)
        for b in range(2):
            single = model(images[b:b + 1], query_points=queries[b:b + 1])
            assert_outputs_close({k: v[b:b + 1] for k, v in both.items() if torch.is_tensor(v)}, single)


def test_first_frame_is_special_and_other_frames_are_exchangeable():
    model = make_model(small_config().replace(enable_track=False))
    images = torch.rand(1, 3, 3, 28, 28)
    with torch.no_grad():
        out = model(images)
        swapped = model(images[:, [0, 2, 1]])
        reference_changed = model(images[:, [1, 0, 2]])
    for key in ("pose_enc", "depth", "world_points"):
        assert_outputs_close({key: swapped[key][:, [0, 2, 1]]}, {key: out[key]})
    assert not torch.allclose(reference_changed["pose_enc"][:, [1, 0, 2]], out["pose_enc"], atol=1e-4)


@pytest.mark.parametrize("height, width", [(70, 42), (28, 84)])
def test_position_embedding_is_resized_per_axis(height, width):
    """Portrait and landscape grids: a row ramp must stay a row ramp (no H/W swap)."""
    agg = Aggregator(AggregatorConfig(img_size=56, embed_dim=8, depth=1, num_heads=2), PatchEmbedConfig(depth=1, num_heads=2))
    dino = agg.patch_embed
    grid = dino.grid
    rows, cols = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    with torch.no_grad():
        dino.pos_embed.zero_()
        dino.pos_embed[0, 1:, 0] = rows.flatten()
        dino.pos_embed[0, 1:, 1] = cols.flatten()
    gh, gw = height // 14, width // 14
    pos = dino._position_embedding(gh, gw, torch.float32)[0, 1:].reshape(gh, gw, -1)
    assert pos.shape == (gh, gw, 8)
    assert torch.allclose(pos[..., 0], pos[:, :1, 0].expand(gh, gw), atol=1e-5)  # rows constant along columns
    assert torch.allclose(pos[..., 1], pos[:1, :, 1].expand(gh, gw), atol=1e-5)
    assert (pos[1:, 0, 0] > pos[:-1, 0, 0]).all() and (pos[0, 1:, 1] > pos[0, :-1, 1]).all()
    assert dino._position_embedding(grid, grid, torch.float32) is dino.pos_embed
    out = agg(torch.rand(1, 2, 3, height, width))[0]
    assert out[-1].shape == (1, 2, gh * gw + 5, 16)


def test_image_size_must_be_a_patch_multiple():
    model = make_model(small_config())
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model(torch.rand(1, 1, 3, 30, 28))


# ---------------------------------------------------------------------------------- aggregator
def _hand_composed_layers(agg: Aggregator, images: torch.Tensor) -> list[torch.Tensor]:
    """The alternation written out plainly from the config: block groups of aa_block_size."""
    B, S, _, H, W = images.shape
    tokens = agg._embed(images)
    P, C = tokens.shape[1:]
    pos = patch_positions(H // 14, W // 14, agg.patch_start_idx, images.device)
    size, outputs, layer = agg.aa_block_size, [], 0
    while layer < agg.depth:
        results = {}
        for kind in agg.aa_order:
            blocks = agg.frame_blocks if kind == "frame" else agg.global_blocks
            shape, kind_pos = ((B * S, P, C), pos) if kind == "frame" else ((B, S * P, C), pos.repeat(1, S, 1))
            results[kind] = []
            for i in range(layer, layer + size):
                tokens = blocks[i](tokens.reshape(shape), pos=kind_pos)
                results[kind].append(tokens.reshape(B, S, P, C))
        outputs += [torch.cat((f, g), dim=-1) for f, g in zip(results["frame"], results["global"])]
        layer += size
    return outputs


@pytest.mark.parametrize("block_size, order", [(1, ("frame", "global")), (2, ("frame", "global")),
                                               (3, ("global", "frame"))])
def test_aggregator_alternation_matches_hand_composition(block_size, order):
    model = make_model(small_config(aa_block_size=block_size, aa_order=order).replace(keep_all_layers=True))
    images = torch.rand(2, 2, 3, 28, 42)
    with torch.no_grad():
        got, start = model.aggregator(images)
        want = _hand_composed_layers(model.aggregator, images)
    assert start == 5 and len(got) == 6
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_kept_layers_follow_enabled_heads():
    cfg = small_config()
    assert cfg.kept_layers() == (0, 2, 3, 5)
    assert cfg.replace(enable_depth=False, enable_point=False, enable_track=False).kept_layers() == (5,)
    assert cfg.replace(enable_camera=False).kept_layers() == (0, 2, 3, 5)
    assert cfg.replace(keep_all_layers=True).kept_layers() == tuple(range(6))
    model = make_model(cfg.replace(enable_depth=False, enable_point=False, enable_track=False))
    with torch.no_grad():
        layers, _ = model.aggregator(torch.rand(1, 2, 3, 28, 28))
    assert [i for i, t in enumerate(layers) if t is not None] == [5]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive during a region (CPU), tracked per op output."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if id(storage) not in self._sizes and storage.nbytes():
                    self._sizes[id(storage)] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, id(storage))
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def _measure_training_forward(model: VGGT, images: torch.Tensor):
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    live = LiveBytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), live:
        out = model(images)
    return out, sum(saved.values()), live.peak


def test_layer_keeping_saves_exactly_the_dropped_layers():
    """Upstream keeps all `depth` layer outputs (B, S, P+5, 2C) until the heads are done.

    Keeping only the read ones changes no output and no saved tensor (torch.cat saves nothing for
    backward), and lowers the forward's peak live memory by exactly the dropped layers' bytes.
    """
    model = make_model(small_config().replace(enable_track=False)).train()
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        model(images)  # warm the RoPE tables so both measurements allocate the same things
    model.set_keep_all_layers(True)
    out_all, saved_all, peak_all = _measure_training_forward(model, images)
    model.set_keep_all_layers(False)
    out_kept, saved_kept, peak_kept = _measure_training_forward(model, images)

    dropped = [i for i in range(6) if i not in model.aggregator.kept_layers]
    assert dropped == [1, 4]
    B, S, P, C2 = 1, 2, 2 * 3 + 5, 64
    layer_bytes = B * S * P * C2 * 4
    assert peak_all - peak_kept == len(dropped) * layer_bytes
    assert saved_all == saved_kept
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert torch.equal(out_all[key], out_kept[key])
    loss_all = sum(v.sum() for k, v in out_all.items() if k != "pose_enc_list")
    loss_all.backward()
    grads_all = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sum(v.sum() for k, v in out_kept.items() if k != "pose_enc_list").backward()
    assert all(torch.equal(p.grad, grads_all[n]) for n, p in model.named_parameters() if p.grad is not None)


def test_heads_compute_in_fp32_under_bf16_autocast():
    model = make_model(small_config())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 2, 3, 28, 28), query_points=torch.rand(1, 3, 2) * 28)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert out[key].dtype == torch.float32, key
    assert out["track"].shape == (1, 2, 3, 2)


# ---------------------------------------------------------------------------------- layers
def test_rope_positions_and_relative_invariance():
    rope = RotaryPositionEmbedding2D(100)
    q, k = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4, 16)
    zeros = torch.zeros(1, 4, 2, dtype=torch.long)
    assert torch.allclose(rope(q, zeros), q)  # special tokens at (0, 0) are not rotated
    pos_q = torch.tensor([[[1, 2], [3, 1], [2, 2], [4, 5]]])
    pos_k = torch.tensor([[[2, 1], [1, 1], [5, 3], [3, 3]]])
    shift = torch.tensor([2, 3])
    dots = (rope(q, pos_q) * rope(k, pos_k)).sum(-1)
    shifted = (rope(q, pos_q + shift) * rope(k, pos_k + shift)).sum(-1)
    assert torch.allclose(dots, shifted, atol=1e-5)  # attention sees only relative positions
    rows_only = rope(q, torch.tensor([[[3, 0]] * 4]))
    assert torch.equal(rows_only[..., 8:], q[..., 8:])  # the second half belongs to the column
    pos = patch_positions(2, 3, 5, torch.device("cpu"))
    assert pos.shape == (1, 11, 2) and pos[0, :5].abs().sum() == 0
    assert pos[0, 5:].tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]


def test_attention_equals_explicit_softmax_attention():
    torch.manual_seed(0)
    attn = Attention(32, 4, qk_norm=True, rope=RotaryPositionEmbedding2D(100))
    x, pos = torch.randn(2, 7, 32), patch_positions(2, 3, 1, torch.device("cpu"))
    qkv = attn.qkv(x).reshape(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k, v = attn.rope(attn.q_norm(qkv[0]), pos), attn.rope(attn.k_norm(qkv[1]), pos), qkv[2]
    weights = F.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
    want = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(attn(x, pos=pos), want, atol=1e-5)
    with pytest.raises(ValueError, match="needs token positions"):
        attn(x)


def test_conv_patch_embed_and_no_rope_variants_run():
    cfg = small_config(rope_freq=0).replace(patch_embed=PatchEmbedConfig(type="conv"), enable_track=False)
    model = make_model(cfg)
    assert model.aggregator.rope is None and "aggregator.patch_embed.proj.weight" in model.state_dict()
    with torch.no_grad():
        out = model(torch.rand(1, 2, 3, 28, 28))
    assert out["depth"].shape == (1, 2, 28, 28, 1) and torch.isfinite(out["depth"]).all()


def test_portrait_images_through_all_heads():
    model = make_model(small_config())
    with torch.no_grad():
        out = model(torch.rand(1, 2, 3, 70, 42), query_points=torch.tensor([[[10.0, 60.0], [30.0, 5.0]]]))
    assert out["depth"].shape == (1, 2, 70, 42, 1) and out["world_points"].shape == (1, 2, 70, 42, 3)
    assert out["track"].shape == (1, 2, 2, 2) and out["vis"].shape == (1, 2, 2)
    assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v))


def test_rope_tables_gathered_once_are_shared_by_every_call():
    """The aggregator gathers the tables once a pass; autograd then saves one set for all blocks."""
    rope = RotaryPositionEmbedding2D(100)
    pos = patch_positions(3, 4, 5, torch.device("cpu"))
    tables = rope.tables(pos, 8)
    saved_per_call = []
    for _ in range(2):
        x = torch.randn(1, 2, 17, 16, requires_grad=True)
        ptrs = set()

        def pack(t):
            ptrs.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = rope(x, tables)
        saved_per_call.append(ptrs)
        assert torch.equal(out, rope(x, pos))  # gathering inside forward gives the same rotation
    assert len(saved_per_call[0]) == 4  # cos/sin for rows and columns
    assert saved_per_call[0] == saved_per_call[1]


def test_aggregator_gathers_rope_tables_once_per_pass(monkeypatch):
    model = make_model(small_config())
    calls = []
    gather = model.aggregator.rope.tables
    monkeypatch.setattr(model.aggregator.rope, "tables", lambda *a: calls.append(a) or gather(*a))
    with torch.no_grad():
        model(torch.rand(1, 2, 3, 28, 42))
    assert len(calls) == 2  # frame positions and global positions, not once per block
    for positions, _, length in calls:  # the table size is passed in (no host sync), and right
        assert length == int(positions.max()) + 1


def test_fsdp_input_casting_leaves_rope_tables_to_the_attention():
    """A bf16 FSDP2 unit casts its floating inputs; the shared RoPE tables must reach every block as the
    aggregator made them (one fp32 set, saved once), not as a bf16-rounded copy per block."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from vggt_fsdp.memory.fake_pg import fake_process_group
    from vggt_fsdp.model.layers import Block

    rope = RotaryPositionEmbedding2D(100)
    blocks = torch.nn.ModuleList(Block(32, 2, qk_norm=True, rope=rope) for _ in range(2))
    pos = patch_positions(2, 2, 1, torch.device("cpu"))
    tables = rope.tables(pos, 8)
    received = []
    for block in blocks:
        block.attn.forward = lambda x, pos, attn_forward=block.attn.forward: received.append(pos) or attn_forward(x, pos)
    with fake_process_group(1):
        mesh = init_device_mesh("cpu", (1,))
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        x = torch.randn(1, pos.shape[1], 32)
        for block in blocks:
            x = block(x, pos=tables)
    assert len(received) == 2 and all(p is tables for p in received)
