"""`vggt-fsdp data check`: every frame read once; bad files named; exit status 1 on problems."""
import json

from data_writers import render_world, write_colmap, write_folder
from vggt_fsdp.cli import main


def _folder_recipe_args(root) -> list[str]:
    return ["recipes/cpu_tiny.yaml", "data.source=folder", f"data.root={root}"]


def test_a_clean_folder_dataset_passes_with_statistics(tmp_path, capsys):
    world = render_world(4, 3, (24, 32))
    for i in range(3):
        write_folder(tmp_path / "data", world, scene=f"scene_{i}")
    report = tmp_path / "report.json"
    assert main(["data", "check", *_folder_recipe_args(tmp_path / "data"), "--json", str(report)]) == 0
    captured = capsys.readouterr()
    assert "0 problem(s) in 9 frames read" in captured.out
    assert "depth:" in captured.out and "image sizes 32x24" in captured.out
    assert "[data check] folder (train)" in captured.err  # progress on stderr
    rows = json.loads(report.read_text())
    assert sum(r["scenes"] for r in rows) == 3 and {r["split"] for r in rows} == {"train", "val"}
    read = [r for r in rows if r["frames_read"]]
    assert all(0 < r["depth_m"]["min"] <= r["depth_m"]["max"] < 20 for r in read)


def test_one_corrupt_file_is_named_and_the_exit_status_is_non_zero(tmp_path, capsys):
    world = render_world(4, 3, (24, 32))
    scene = write_folder(tmp_path / "data", world, depth_kinds=("png",))
    write_folder(tmp_path / "data", world, scene="intact")
    corrupt = scene / "depth/0001.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # truncated mid-file
    code = main(["data", "check", *_folder_recipe_args(tmp_path / "data"), "--split", "train"])
    out = capsys.readouterr().out
    assert code == 1
    problems = [line for line in out.splitlines() if line.strip().startswith("problem:")]
    assert len(problems) == 1 and str(corrupt) in problems[0]
    assert "1 problem(s) in 5 frames read" in out


def test_unlistable_scenes_and_impossible_cameras_are_reported_per_source(tmp_path, capsys):
    world = render_world(4, 2, (24, 32))
    write_folder(tmp_path / "f", world)
    (tmp_path / "f" / "broken").mkdir()
    (tmp_path / "f" / "broken" / "scene.json").write_text("{not json")
    write_colmap(tmp_path / "c", world, model="OPENCV")
    sources = (f"data.sources=[{{source: folder, root: '{tmp_path / 'f'}', val_fraction: 0.0}}, "
               f"{{source: colmap, root: '{tmp_path / 'c'}', val_fraction: 0.0}}, {{source: synthetic}}]")
    assert main(["data", "check", "recipes/cpu_tiny.yaml", sources, "--split", "train"]) == 1
    out = capsys.readouterr().out
    assert "broken/scene.json: malformed" in out
    assert "camera 1 is OPENCV; only undistorted PINHOLE and SIMPLE_PINHOLE" in out
    assert "source synthetic (synthetic), train split: rendered on the fly: no files to read" in out
    assert "source folder" in out and "2 frames read" in out


def test_colmap_depth_maps_are_compared_with_the_models_sparse_points(tmp_path, capsys):
    world = render_world(4, 2, (24, 32), open_top=False)
    write_colmap(tmp_path, world, depth_kind="png")  # 16-bit millimetres
    base = ["data", "check", "recipes/cpu_tiny.yaml", "data.source=colmap", f"data.root={tmp_path}",
            "data.val_fraction=0.0", "data.colmap.depth_path=depths/{stem}.png"]
    assert main([*base, "data.colmap.depth_scale=0.001", "--split", "train"]) == 0
    assert "depth maps / depth of the model's sparse points: 1" in capsys.readouterr().out
    assert main([*base, "--split", "train"]) == 1  # depth_scale left at 1: millimetres read as metres
    assert "the depth maps are 1000 times the depth of the model's sparse points" in capsys.readouterr().out
