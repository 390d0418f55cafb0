import json

import numpy as np

from vggt_fsdp.cli import main
from vggt_fsdp.data.png import decode_png


def test_data_preview_writes_a_sheet_and_a_summary(tmp_path, capsys):
    out = tmp_path / "preview"
    code = main(["data", "preview", "recipes/cpu_tiny.yaml", "data.frames_range=[2,2]", "data.frames_per_gpu=4",
                 "data.image_width=56", "data.aspect_range=[0.5,0.5]", "--out", str(out), "--step", "3"])
    assert code == 0
    summary = json.loads((out / "batch.json").read_text())
    tensors = summary["tensors"]
    assert tensors["images"]["shape"] == [2, 2, 3, 28, 56] and summary["step"] == 3
    assert 0 <= tensors["images"]["min"] and tensors["images"]["max"] <= 1
    assert tensors["depths"]["over"] == "point_masks" and tensors["depths"]["min"] > 0
    assert 0 < tensors["point_masks"]["true_fraction"] <= 1
    sheet = decode_png((out / "batch.png").read_bytes())
    assert sheet.shape == (4 * 28, 4 * 56, 3) and sheet.dtype == np.uint8 and sheet.std() > 10
    assert '"tensors"' in capsys.readouterr().out
