import json

import numpy as np

from data_writers import render_world, write_folder
from vggt_fsdp.cli import main
from vggt_fsdp.data.png import decode_png
from vggt_fsdp.data.sheet import GLYPH_H, draw_text, text_width

SMALL = ["data.frames_range=[2,2]", "data.frames_per_gpu=4", "data.image_width=56", "data.aspect_range=[0.5,0.5]"]


def test_data_preview_writes_a_labelled_sheet_and_a_summary_file(tmp_path, capsys):
    out = tmp_path / "preview"
    code = main(["data", "preview", "recipes/cpu_tiny.yaml", *SMALL, "--out", str(out), "--step", "3"])
    assert code == 0
    summary = json.loads((out / "batch.json").read_text())
    assert summary["step"] == 3 and list(summary["sources"]) == ["synthetic"]
    tensors = summary["sources"]["synthetic"]["tensors"]
    assert tensors["images"]["shape"] == [2, 2, 3, 28, 56]
    assert 0 <= tensors["images"]["min"] and tensors["images"]["max"] <= 1
    assert tensors["depths"]["over"] == "point_masks" and tensors["depths"]["min"] > 0
    assert 0 < tensors["point_masks"]["true_fraction"] <= 1
    sheet = decode_png((out / "batch-synthetic.png").read_bytes())
    # 56 px frames are drawn twice as large (112 px panels), under a title and a header line
    assert sheet.dtype == np.uint8 and sheet.shape[1] > 4 * 112 and sheet.shape[0] > 4 * 56
    assert sheet.std() > 10
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) == 2  # a line per source and where the JSON is: no JSON dump
    assert "synthetic: 2 scenes x 2 frames, 56x28" in printed and "batch-synthetic.png" in printed


def test_the_sheet_labels_its_panels():
    canvas = np.zeros((12, 80))
    draw_text(canvas, 1, 1, "world xyz")
    assert canvas.any() and canvas[1:1 + GLYPH_H, 1:1 + text_width("world xyz")].any()
    assert not canvas[:, 1 + text_width("world xyz") + 1:].any()  # nothing drawn past the text
    a, b = np.zeros((9, 7)), np.zeros((9, 7))
    draw_text(a, 1, 1, "A")
    draw_text(b, 1, 1, "B")
    assert not np.array_equal(a, b)  # distinct glyphs


def test_data_preview_draws_each_source_of_a_mixture(tmp_path, capsys):
    write_folder(tmp_path / "data", render_world(2, 3, (28, 40)), depth_kinds=("npy",))
    sources = (f"data.sources=[{{source: synthetic}}, {{source: folder, root: '{tmp_path / 'data'}', name: mine, "
               "val_fraction: 0.0}]")
    out = tmp_path / "preview"
    assert main(["data", "preview", "recipes/cpu_tiny.yaml", *SMALL, sources, "--out", str(out)]) == 0
    summary = json.loads((out / "batch.json").read_text())
    assert list(summary["sources"]) == ["synthetic", "mine"]
    for label in ("synthetic", "mine"):
        assert decode_png((out / f"batch-{label}.png").read_bytes()).std() > 10
        assert summary["sources"][label]["tensors"]["images"]["shape"][-2:] == [28, 56]
    assert "mine: 2 scenes x 2 frames" in capsys.readouterr().out


def test_a_source_that_cannot_be_previewed_is_named_and_the_status_is_non_zero(tmp_path, capsys):
    write_folder(tmp_path / "data", render_world(2, 3, (28, 40)), depth_kinds=("npy",))
    sources = (f"data.sources=[{{source: synthetic}}, {{source: folder, root: '{tmp_path / 'data'}', name: mine, "
               "val_fraction: 0.0}]")  # every scene trains: none is held out for validation
    code = main(["data", "preview", "recipes/cpu_tiny.yaml", *SMALL, sources, "--out", str(tmp_path / "p"),
                 "--split", "val"])
    out = capsys.readouterr().out
    assert code == 1 and "mine: no preview: the val split has no scenes" in out and "synthetic: 2 scenes" in out
