"""The emotion model's arithmetic: bf16 where the device has it natively (the default), float32 elsewhere; what bf16
changes in the answers, and that it never depends on how faces are batched (segments must match one run)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fervid.errors import FervidError
from fervid.model.config import DEFAULT_MODEL, DEFAULT_PRECISION
from fervid.model.device import resolve_precision
from fervid.model.loader import load_model
from fervid.training.data import load_fer2013
from fervid.worker.settings import Options
from fervid.worker.store.schema import EMOTIONS
from tests.conftest import ROOT, run_cli, shared_path

CPU = torch.device("cpu")


def test_auto_is_bf16_only_on_cpus_that_have_it(monkeypatch):
    assert Options().precision == DEFAULT_PRECISION == "auto"
    for avx512_bf16, amx, want in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_precision("auto", CPU) == want
        assert load_model("small", precision="auto").precision == want  # the fallback loads and runs
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(FervidError, match="unknown precision 'half'"):
        resolve_precision("half", CPU)


def test_bf16_keeps_the_default_models_answers_and_ignores_batching(fer_npz):
    faces, labels = load_fer2013(fer_npz).split("PrivateTest")
    faces, labels = torch.from_numpy(faces[:1500]), labels[:1500]
    fp32 = load_model(DEFAULT_MODEL, precision="fp32").predict_proba(faces).numpy()
    clf = load_model(DEFAULT_MODEL, precision="bf16")
    bf16 = clf.predict_proba(faces, batch_size=256).numpy()
    assert (fp32.argmax(1) == bf16.argmax(1)).mean() >= 0.99
    assert np.abs(fp32 - bf16).max() < 0.06
    assert abs((fp32.argmax(1) == labels).mean() - (bf16.argmax(1) == labels).mean()) <= 0.005
    # The pipeline's batches hold however many faces its frames have: every size must give the same numbers.
    for size in (1, 3, 17, 100):
        assert np.array_equal(clf.predict_proba(faces[:200], batch_size=size).numpy(), bf16[:200]), size


def test_analyze_runs_in_the_chosen_arithmetic(tmp_path):
    """Same clip, default (auto) and --precision fp32: the same faces and boxes, the same emotions to bf16's
    rounding; eval says which arithmetic it measured."""
    video = shared_path("videos", "pyfeat_single_face.mp4")
    rows = {}
    for name, extra in (("default", ()), ("fp32", ("--precision", "fp32"))):
        out = tmp_path / f"{name}.csv"
        run_cli("analyze", str(video), "--fps", "10", "--db", f"sqlite:///{tmp_path / name}.db", "--csv", str(out),
                *extra, check=True)  # fmt: skip
        with open(out) as f:
            rows[name] = list(csv.DictReader(f))
    a, b = rows["default"], rows["fp32"]
    assert len(a) == len(b) == 24
    for ra, rb in zip(a, b, strict=True):
        assert ra["time_s"] == rb["time_s"] and ra["x1"] == rb["x1"] and ra["y2"] == rb["y2"]
        assert max(abs(float(ra[e]) - float(rb[e])) for e in EMOTIONS) < 0.06
    if resolve_precision("auto", CPU) == "fp32":  # a CPU without native bf16: the default is float32 exactly
        assert a == b
    bad = run_cli("analyze", str(video), "--precision", "half")
    assert bad.returncode == 2 and "invalid choice: 'half'" in bad.stderr


def test_eval_reports_its_arithmetic(fer_npz, tmp_path):
    csv_path = tmp_path / "few.csv"  # a small slice in Kaggle's CSV form keeps this quick
    images, labels = load_fer2013(fer_npz).split("PrivateTest")
    with open(csv_path, "w") as f:
        f.write("emotion,pixels,Usage\n")
        for img, y in zip(images[:300], labels[:300], strict=True):
            f.write(f"{y},{' '.join(map(str, img.ravel()))},PrivateTest\n")
    reports = {p: json.loads(run_cli("eval", "--model", "small", "--data", str(csv_path), "--json",
                                     *(("--precision", p) if p else ()), check=True).stdout)  # fmt: skip
               for p in (None, "auto")}  # fmt: skip
    assert reports[None]["precision"] == "fp32"  # eval's default: the figures every machine reproduces
    assert reports["auto"]["precision"] == resolve_precision("auto", CPU)
    assert abs(reports[None]["accuracy"] - reports["auto"]["accuracy"]) <= 0.02


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_the_commands_that_run_jobs_refuse_an_unknown_precision(command):
    env = os.environ | {"FERVID_PRECISION": "half"}
    proc = subprocess.run([sys.executable, "-m", "fervid.cli", command], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and "FERVID_PRECISION='half' is not one of auto, fp32, bf16" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
