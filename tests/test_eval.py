"""The shipped `small` weights, evaluated the way the README says: accuracy, report fields, listing, errors."""

import json

from model.weights import sha256_file
from tests.conftest import ROOT, run_cli


def test_shipped_small_scores_on_private_test(fer_npz, tmp_path):
    png = tmp_path / "cm.png"
    proc = run_cli("eval", "--model", "small", "--data", str(fer_npz), "--split", "PrivateTest", "--json",
                   "--tta", "flip", "--confusion", str(png), check=True)  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["model"] == "small" and report["split"] == "PrivateTest" and report["n"] == 3589
    assert report["accuracy"] >= 0.64
    assert report["tta_accuracy"]["flip"] >= report["accuracy"] - 0.01
    assert set(report["per_class"]) == {"Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"}
    assert all({"precision", "recall", "f1", "support"} <= set(m) for m in report["per_class"].values())
    cm = report["confusion"]
    assert len(cm) == 7 and sum(map(sum, cm)) == 3589
    assert png.read_bytes()[:4] == b"\x89PNG"
    # The committed report beside the weights says the same.
    committed = json.loads((ROOT / "model" / "weights" / "small.PrivateTest.json").read_text())
    assert committed["accuracy"] == report["accuracy"]


def test_models_listing():
    rows = {r["name"]: r for r in json.loads(run_cli("models", "--json", check=True).stdout)}
    small = rows["small"]
    assert small["sha256"] == sha256_file(ROOT / "model" / "weights" / "small.safetensors")
    assert small["accuracy"]["PrivateTest"] >= 0.64 and small["input_size"] == [1, 48, 48]
    assert rows["seed"]["parameters"] == 5_902_151 and rows["seed"]["weights"] is None
    table = run_cli("models", check=True).stdout
    assert "small" in table and "seed" in table


def test_eval_errors_are_one_line(tmp_path):
    missing = run_cli("eval", "--data", str(tmp_path / "nope.npz"))
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("a,b\n1,2\n")
    wrong = run_cli("eval", "--data", str(bad_csv))
    unknown = run_cli("eval", "--model", "nosuch", "--data", str(bad_csv))
    for proc, needle in [(missing, "nope.npz: data file not found"), (wrong, "CSV columns"),
                         (unknown, "unknown model 'nosuch'")]:  # fmt: skip
        assert proc.returncode == 2 and needle in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
