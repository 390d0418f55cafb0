import dataclasses

import pytest
import torch

from vggt_fsdp.geometry import extrinsics_intrinsics_to_pose_encoding, make_intrinsics, quat_to_rotation
from vggt_fsdp.losses import (
    CameraLossConfig, DenseLossConfig, LossConfig, TrackLossConfig, camera_loss, compute_loss, dense_loss,
    track_loss,
)

B, S, H, W, N = 2, 3, 12, 16, 10


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, 4, generator=gen)
    extr = torch.cat([quat_to_rotation(q), torch.randn(B, S, 3, 1, generator=gen)], -1)
    f = torch.full((B, S), 20.0)
    intr = make_intrinsics(f, f, torch.full_like(f, W / 2), torch.full_like(f, H / 2))
    tracks = torch.rand(B, S, N, 2, generator=gen) * W
    vis = torch.rand(B, S, N, generator=gen) > 0.3
    vis[:, 0] = True
    return {
        "images": torch.rand(B, S, 3, H, W, generator=gen),
        "extrinsics": extr, "intrinsics": intr,
        "depths": torch.rand(B, S, H, W, generator=gen) + 1,
        "world_points": torch.randn(B, S, H, W, 3, generator=gen),
        "point_masks": torch.rand(B, S, H, W, generator=gen) > 0.2,
        "tracks": tracks, "track_vis_mask": vis,
    }


def _perfect(batch) -> dict[str, object]:
    gt = extrinsics_intrinsics_to_pose_encoding(batch["extrinsics"], batch["intrinsics"], (H, W))
    return {
        "pose_enc_list": [gt.clone().requires_grad_() for _ in range(4)],
        "depth": batch["depths"][..., None].clone().requires_grad_(),
        "depth_conf": torch.ones(B, S, H, W, requires_grad=True),
        "world_points": batch["world_points"].clone().requires_grad_(),
        "world_points_conf": torch.ones(B, S, H, W, requires_grad=True),
        "track_list": [batch["tracks"].clone().requires_grad_()],
        "vis_logits": ((batch["track_vis_mask"].float() * 2 - 1) * 40).requires_grad_(),  # sigmoid: 0 or 1
        "conf_logits": torch.full((B, S, N), 40.0, requires_grad=True),
    }


def _cfg(**dense) -> LossConfig:
    # small test maps: lower the element thresholds so the quantile and min-points paths are exercised
    d = dict(min_valid_points=10, quantile_min_elements=50)
    d.update(dense)
    return LossConfig(camera=CameraLossConfig(min_valid_points=10),
                      depth=DenseLossConfig(**d),
                      point=DenseLossConfig(gradient="normal", gradient_scales=3, **d),
                      track=TrackLossConfig(enabled=True))


def test_every_term_is_zero_at_ground_truth_and_total_is_weighted_sum():
    batch = _batch()
    total, terms = compute_loss(_perfect(batch), batch, _cfg())
    for name, value in terms.items():
        assert value.abs() < 1e-5, name
        assert not value.requires_grad, f"{name} must be detached for logging"
    assert total.requires_grad


def test_total_is_the_weighted_sum_of_parts():
    batch = _batch()
    pred = _perfect(batch)
    pred["depth"] = pred["depth"] + 0.3
    pred["pose_enc_list"] = [p + 0.1 for p in pred["pose_enc_list"]]
    cfg = _cfg()
    total, terms = compute_loss(pred, batch, cfg)
    expected = (cfg.camera.weight * terms["loss_camera"] + cfg.depth.weight * terms["loss_depth"]
                + cfg.point.weight * terms["loss_point"] + cfg.track.weight * terms["loss_track_total"])
    assert torch.allclose(total.detach(), expected)
    assert terms["loss_depth"] > 0 and terms["loss_camera"] > 0


def test_camera_loss_weights_iterations_by_gamma():
    batch = _batch()
    gt = extrinsics_intrinsics_to_pose_encoding(batch["extrinsics"], batch["intrinsics"], (H, W))
    cfg = CameraLossConfig(min_valid_points=10, gamma=0.6)
    losses = []
    for wrong in range(4):
        preds = [gt.clone() for _ in range(4)]
        preds[wrong] = preds[wrong] + torch.tensor([0.1] * 3 + [0.0] * 6)  # translation off by 0.1
        losses.append(camera_loss(preds, batch, cfg)["loss_T"])
    for i, loss in enumerate(losses):
        assert loss == pytest.approx(0.1 * 0.6 ** (3 - i) / 4, rel=1e-4)


def test_camera_loss_skips_scenes_whose_first_frame_has_too_few_valid_points():
    batch = _batch()
    gt = extrinsics_intrinsics_to_pose_encoding(batch["extrinsics"], batch["intrinsics"], (H, W))
    pred = gt.clone()
    pred[0] += 5.0  # garbage on every frame of scene 0
    pred[1, 2, :3] += 1.0  # scene 1: frame 2's translation off by 1
    batch["point_masks"][0, 0] = False  # scene 0's reference frame has no valid points
    batch["point_masks"][1, 2] = False  # a later frame without depth still has a valid pose
    terms = camera_loss([pred], batch, CameraLossConfig(min_valid_points=10))
    assert terms["loss_T"] == pytest.approx(3 * 1.0 / (S * 3), rel=1e-5)  # only scene 1, all frames


def test_losses_are_finite_and_zero_with_empty_masks_even_with_nonfinite_unmasked_values():
    batch = _batch()
    batch["point_masks"][:] = False
    batch["track_vis_mask"][:] = False
    batch["world_points"][..., 0] = float("nan")  # invalid GT where nothing is valid
    pred = _perfect(batch)
    pred["depth"] = (pred["depth"] * 3).detach().requires_grad_()
    total, terms = compute_loss(pred, batch, _cfg())
    assert torch.isfinite(total)
    for name, value in terms.items():
        if name.startswith(("loss_depth", "loss_point", "loss_conf_", "loss_reg_", "loss_grad_", "loss_track", "loss_vis")):
            assert value == 0, name
    total.backward()
    assert torch.isfinite(pred["depth"].grad).all() and torch.isfinite(pred["world_points"].grad).all()


def test_masked_out_pixels_do_not_affect_loss_or_gradient():
    batch = _batch()
    pred = _perfect(batch)
    outside = ~batch["point_masks"]
    depth = pred["depth"].detach().clone()
    depth[outside[..., None]] = 1e6
    depth.requires_grad_()
    terms = dense_loss(depth, pred["depth_conf"], batch["depths"][..., None], batch["point_masks"],
                       _cfg().depth, "depth")
    assert terms["loss_reg_depth"] == 0 and terms["loss_conf_depth"] == 0 and terms["loss_grad_depth"] == 0
    terms["loss_depth"].backward()
    assert (depth.grad[outside[..., None]] == 0).all()


@pytest.mark.parametrize("key", ["depth", "world_points"])
def test_dense_gradient_points_towards_ground_truth(key):
    batch = _batch()
    pred = _perfect(batch)
    gen = torch.Generator().manual_seed(5)
    offset = torch.randn(pred[key].shape, generator=gen) * 0.1
    moved = (pred[key].detach() + offset).requires_grad_()
    pred[key] = moved
    cfg = _cfg()
    cfg.camera.enabled = cfg.track.enabled = False
    total, _ = compute_loss(pred, batch, cfg)
    total.backward()
    mask = batch["point_masks"]
    # a small step against the gradient reduces the loss, and on valid pixels the gradient has a
    # positive component along the error
    assert (moved.grad * offset)[mask].sum() > 0
    with torch.no_grad():
        pred[key] = moved - 1e-3 * moved.grad / moved.grad.abs().max()
        stepped, _ = compute_loss(pred, batch, cfg)
    assert stepped < total


def test_confidence_term_is_minimised_at_alpha_over_error():
    batch = _batch()
    err = 0.5
    cfg = DenseLossConfig(min_valid_points=10, quantile=0.0, gradient="none", conf_alpha=0.2)
    pred = batch["depths"][..., None] + err
    values = {}
    for conf in (0.2, 0.4, 0.8):  # minimum of conf * err - alpha * log(conf) is alpha / err = 0.4
        c = torch.full((B, S, H, W), conf)
        values[conf] = dense_loss(pred, c, batch["depths"][..., None], batch["point_masks"], cfg, "d")["loss_conf_d"]
    assert values[0.4] < values[0.2] and values[0.4] < values[0.8]


def test_quantile_cut_drops_the_outliers():
    batch = _batch()
    batch["point_masks"][:] = True
    cfg = DenseLossConfig(min_valid_points=10, quantile_min_elements=50, quantile=0.98, gradient="none")
    gen = torch.Generator().manual_seed(6)
    pred = batch["depths"][..., None] + torch.rand(B, S, H, W, 1, generator=gen) * 0.02
    pred[0, 0, 0, :5] += 50.0  # 5 of 1152 pixels: above the 98th percentile
    terms = dense_loss(pred, torch.ones(B, S, H, W), batch["depths"][..., None], batch["point_masks"], cfg, "d")
    assert terms["loss_reg_d"] < 0.02
    uncut = dense_loss(pred, torch.ones(B, S, H, W), batch["depths"][..., None], batch["point_masks"],
                       dataclasses.replace(cfg, quantile=0.0), "d")
    assert uncut["loss_reg_d"] > 0.2


def test_normal_loss_ignores_scale_but_sees_shape():
    batch = _batch()
    cfg = DenseLossConfig(min_valid_points=10, quantile=0.0, gradient="normal", gradient_scales=1)
    ones = torch.ones(B, S, H, W)
    gt = batch["world_points"]
    shifted = dense_loss(gt + 1.0, ones, gt, batch["point_masks"], cfg, "p")  # same normals
    assert shifted["loss_grad_p"] < 1e-5
    bent = gt.clone()
    bent[..., 2] = bent[..., 2] * -1  # mirrored surface: normals change
    assert dense_loss(bent, ones, gt, batch["point_masks"], cfg, "p")["loss_grad_p"] > 0.1


def test_track_loss_iterations_visibility_and_gradient():
    batch = _batch()
    gt = batch["tracks"]
    vis_logits = (batch["track_vis_mask"].float() * 2 - 1) * 20  # right, and confident
    cfg = TrackLossConfig(gamma=0.8)
    near = gt + 1.0  # 1 px off in x and y: L1 mean 1.0
    terms = track_loss([near, gt], vis_logits, torch.full((B, S, N), 20.0), batch, cfg)
    assert terms["loss_track"] == pytest.approx(0.8 / 2, rel=1e-4)
    assert terms["loss_vis"] < 1e-6 and terms["loss_track_conf"] < 1e-6  # the last iteration is on GT
    # visibility and confidence: wrong logits cost about their magnitude, and still have a gradient
    # (as logits: a bf16 probability would round to 1 and stop it)
    wrong_vis = (-vis_logits).requires_grad_()
    wrong = track_loss([gt], wrong_vis, torch.full((B, S, N), -20.0), batch, cfg)
    assert float(wrong["loss_vis"].detach()) == pytest.approx(20.0, rel=1e-3)
    assert float(wrong["loss_track_conf"].detach()) == pytest.approx(20.0, rel=1e-3)
    wrong["loss_vis"].backward()
    assert (wrong_vis.grad[batch["track_vis_mask"][:, :1].expand(-1, S, -1)].abs() > 0).all()
    pred = (gt + 2.0).requires_grad_()
    track_loss([pred], vis_logits, None, batch, cfg)["loss_track"].backward()
    assert (pred.grad[batch["track_vis_mask"]] > 0).all()  # moving back towards GT lowers the loss
    assert (pred.grad[~batch["track_vis_mask"]] == 0).all()


def test_track_loss_counts_only_queries_visible_in_the_first_frame():
    batch = _batch()
    batch["track_vis_mask"][:, 0, 0] = False  # query 0 is undefined: none of its frames count
    gt = batch["tracks"]
    pred = gt.clone()
    pred[:, :, 0] += 50.0
    logits = torch.zeros(B, S, N)
    logits[:, :, 0] = -30.0  # wildly wrong for query 0 only (in frames where it is visible)
    terms = track_loss([pred], logits, None, batch, TrackLossConfig())
    reference = track_loss([gt], torch.where(batch["track_vis_mask"], 0.0, 0.0), None, batch, TrackLossConfig())
    assert terms["loss_track"] == 0 and terms["loss_vis"] == pytest.approx(float(reference["loss_vis"]))


def test_track_loss_auto_follows_the_predictions():
    from vggt_fsdp.losses import track_enabled

    assert track_enabled(TrackLossConfig(enabled="auto"), {"track_list": []})
    assert not track_enabled(TrackLossConfig(enabled="auto"), {"depth": None})
    assert not track_enabled(TrackLossConfig(enabled=False), {"track_list": []})


def test_enabled_loss_without_prediction_raises_and_disabled_is_ignored():
    batch = _batch()
    pred = _perfect(batch)
    del pred["world_points"]
    with pytest.raises(KeyError, match="world_points.*loss.point.enabled"):
        compute_loss(pred, batch, _cfg())
    cfg = _cfg()
    cfg.point.enabled = False
    compute_loss(pred, batch, cfg)


def test_loss_config_validate_names_the_field():
    cfg = LossConfig()
    cfg.validate()
    cfg.depth.gradient_scales = 0
    with pytest.raises(ValueError, match="loss.depth.gradient_scales"):
        cfg.validate()
    cfg = LossConfig()
    cfg.point.hard_max = 0.0
    with pytest.raises(ValueError, match=r"loss.point.hard_max=0.0 must be > 0"):
        cfg.validate()
    cfg = LossConfig()
    for name in ("camera", "depth", "point", "track"):
        getattr(cfg, name).enabled = False
    with pytest.raises(ValueError, match="every loss is disabled"):
        cfg.validate()


def test_compute_loss_never_reads_values_on_the_host():
    """Meta tensors have no data: any .item(), bool(tensor) or data-dependent shape would raise, so
    this passing means the loss adds no device-to-host synchronisation to a training step."""
    batch = {k: v.to("meta") for k, v in _batch().items()}
    pred = {k: [t.detach().to("meta") for t in v] if isinstance(v, list) else v.detach().to("meta")
            for k, v in _perfect(_batch()).items()}
    total, terms = compute_loss(pred, batch, _cfg())
    assert total.device.type == "meta" and all(t.device.type == "meta" for t in terms.values())


def _reference_dense(pred, conf, gt, mask, alpha=0.2, q=0.98, min_elements=50):
    """The upstream formulas written the direct way (boolean indexing, host-side branches)."""
    def cut(values):
        if values.numel() <= min_elements:
            return values.mean()
        values = values.clamp(max=100)
        thresh = values.sort().values[round(q * (values.numel() - 1))]
        kept = values[values < thresh]
        return kept.mean() if kept.numel() > min_elements else values.mean()

    err = (gt[mask] - pred[mask]).norm(dim=-1)
    conf_term = err * conf[mask] - alpha * torch.log(conf[mask])
    total_grad = 0.0
    for k in range(4):
        s = 2 ** k
        p, g, m = pred[..., ::s, ::s, :].flatten(0, 1), gt[..., ::s, ::s, :].flatten(0, 1), mask[..., ::s, ::s].flatten(0, 1)
        mm = m[..., None].expand_as(p).float()
        diff = (p - g) * mm
        gx = (diff[:, :, 1:] - diff[:, :, :-1]).abs() * mm[:, :, 1:] * mm[:, :, :-1]
        gy = (diff[:, 1:] - diff[:, :-1]).abs() * mm[:, 1:] * mm[:, :-1]
        total_grad += (gx.sum() + gy.sum()) / mm.sum()
    return cut(conf_term), cut(err), total_grad / 4


def test_dense_loss_matches_the_direct_upstream_formulas():
    batch = _batch(7)
    gen = torch.Generator().manual_seed(8)
    gt = batch["depths"][..., None]
    pred = gt + torch.randn(gt.shape, generator=gen) * 0.3
    conf = 1 + torch.rand(B, S, H, W, generator=gen) * 3
    cfg = DenseLossConfig(min_valid_points=10, quantile_min_elements=50)
    terms = dense_loss(pred, conf, gt, batch["point_masks"], cfg, "d")
    conf_ref, reg_ref, grad_ref = _reference_dense(pred, conf, gt, batch["point_masks"])
    assert terms["loss_conf_d"] == pytest.approx(float(conf_ref), rel=1e-5)
    assert terms["loss_reg_d"] == pytest.approx(float(reg_ref), rel=1e-5)
    assert terms["loss_grad_d"] == pytest.approx(float(grad_ref), rel=1e-5)
