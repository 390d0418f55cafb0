import json

from benchmarks.bench_data import main


def test_bench_data_writes_a_labelled_result(tmp_path):
    out = tmp_path / "result.json"
    assert main(["--frames", "2", "--scenes", "1", "--width", "56", "--aspects", "0.5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m benchmarks.bench_data --frames 2")
    assert report["device"].startswith("cpu") and report["torch"] and report["date"]
    rows = {row["source"]: row for row in report["results"]}
    assert set(rows) == {"synthetic", "folder"}
    for row in rows.values():
        assert row["image_hw"] == [28, 56] and row["frames_per_s"] > 0 and row["frames_per_cpu_s"] > 0
