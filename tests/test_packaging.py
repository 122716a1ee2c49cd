"""fervid installs as one package: a user's own model.py, worker.py or training.py cannot shadow its parts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from conftest import ROOT

USER_MODULE = 'raise SystemExit("the user\'s own {name}.py was imported in place of fervid\'s")\n'


def test_the_wheel_imports_beside_a_users_own_model_worker_and_training(tmp_path):
    # Build the wheel with the installed setuptools (no download), as `pip install .` would, from a copy of the
    # tree git would commit: setuptools builds in place, and the checkout must not gain a build/ folder.
    src = tmp_path / "src"
    tree = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    for rel in subprocess.check_output(tree, cwd=ROOT, text=True).splitlines():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = wheels.glob("fervid-*.whl")

    # A fresh venv that borrows the dependencies (not fervid) of this one: nothing is downloaded.
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)  # fmt: skip

    # A notebook folder with modules of the same names as the design card's folders.
    work = tmp_path / "notebook"
    work.mkdir()
    for name in ("model", "worker", "training"):
        (work / f"{name}.py").write_text(USER_MODULE.format(name=name))
    probe = (
        "import fervid, fervid.api, fervid.model.loader, fervid.training.train\n"
        "import fervid.worker.pipeline.frames_to_rows, fervid.worker.store.rows, fervid.worker.render\n"
        "import fervid.worker.queue.client, fervid.worker.queue.supervisor, fervid.worker.queue.sweeper\n"
        "import fervid.server.app as a; assert (a.HERE / 'templates/job.html').is_file()\n"
        "assert (a.HERE / 'static/uPlot.iife.min.js').is_file()\n"
        "import model, worker, training\n"  # the user's own still import, and exit: run it last
    )
    proc = subprocess.run([py, "-c", probe], cwd=work, capture_output=True, text=True, timeout=300)
    assert "the user's own model.py was imported" in proc.stderr, proc.stderr  # fervid's imports all passed first
    proc = subprocess.run(
        [py, "-c", "import fervid.model, fervid.worker.store.db as d; print(fervid.model.__file__); "
         "print(d.MIGRATIONS)"],
        cwd=work, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    model_init, migrations = proc.stdout.split()
    assert Path(model_init).is_relative_to(site) and (Path(migrations) / "env.py").is_file()

    # The installed command finds its shipped weights and migrations from there.
    proc = subprocess.run([env / "bin" / "fervid", "models"], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "the default model" in proc.stdout, proc.stderr + proc.stdout
    proc = subprocess.run([env / "bin" / "fervid", "analyze", "--help"], cwd=work, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "--fps" in proc.stdout, proc.stderr
