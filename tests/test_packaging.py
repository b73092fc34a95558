"""The two installs and where files go, in this process: the dependency lists agree, names find the shipped
models after the user's own, `antiphon patches DIR` copies the patches out, and a training command without
TensorFlow says in one line what to install. tests/test_wheel.py checks the same through a real wheel."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from server.cli import TRAIN_ONLY, main
from server.model.files import DEFAULT_MODELS_DIR, all_models, available_models, resolve_model_dir
from server.model.spec import ModelError
from server.places import PATCHES_DIR, user_folder
from server.tools.portability import PLATFORMS, Row, marker_environment, stage_requirements, table

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"tensorflow", "tensorflow-probability", "tf-keras", "keras", "matplotlib"}


def _project() -> dict:
    with (REPO / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"]


def _lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_requirements_txt_is_the_stage_and_the_extras_and_nothing_else():
    project = _project()
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    assert sorted(map(str, map(Requirement, _lines(REPO / "requirements.txt")))) == sorted(
        map(str, map(Requirement, declared)))


def test_the_stage_install_has_no_training_library_and_the_train_extra_has_them_all():
    stage = {r.name for r in stage_requirements()}
    train = {Requirement(line).name for line in _project()["optional-dependencies"]["train"]}
    assert stage.isdisjoint(HEAVY)
    assert {"numpy", "python-osc", "mido", "python-rtmidi", "aiohttp", "platformdirs", "ai-edge-litert"} == stage
    assert {"tensorflow", "tensorflow-probability", "tf-keras", "matplotlib"} == train
    assert set(TRAIN_ONLY) == {"tensorflow", "tensorflow_probability", "tf_keras", "keras", "matplotlib"}


def test_litert_is_asked_for_where_the_portability_table_found_its_wheel():
    """Every platform but an Intel Mac (no ai-edge-litert 2 wheel there) installs LiteRT; rtmidi up to Python 3.12."""
    wanted = {r.name: r for r in stage_requirements()}
    for platform in PLATFORMS:
        for python in ("3.11", "3.12", "3.13"):
            env = marker_environment(platform, python)
            intel_mac = (platform.system, platform.machine) == ("Darwin", "x86_64")
            assert wanted["ai-edge-litert"].marker.evaluate(env) is not intel_mac, (platform.name, python)
            assert wanted["python-rtmidi"].marker.evaluate(env) is (python != "3.13"), (platform.name, python)


def test_the_portability_table_names_what_is_missing():
    rows = [Row("Linux x86_64", "3.11", (), "LiteRT", True, ""),
            Row("macOS x86_64", "3.13", ("numpy",), "numpy", False, "")]
    assert table(rows).splitlines()[2:] == ["| Linux x86_64 | 3.11 | yes | LiteRT | yes |",
                                            "| macOS x86_64 | 3.13 | no: numpy | numpy | python-rtmidi by hand |"]


# --------------------------------------------------------------------------- where models and logs go


def _model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.json").write_text("{}")
    return folder


def test_a_name_is_found_in_your_models_first_then_among_the_shipped_ones(tmp_path):
    mine, shipped = tmp_path / "mine", tmp_path / "shipped"
    _model(shipped / "default")
    _model(shipped / "touch")
    _model(mine / "touch")  # a model you trained under a shipped name replaces it, for you
    _model(mine / "yours")
    for allow_paths in (False, True):  # an OSC client's /model and the command line alike
        assert resolve_model_dir("default", mine, allow_paths, shipped) == shipped / "default"
        assert resolve_model_dir("touch", mine, allow_paths, shipped) == mine / "touch"
        assert resolve_model_dir("yours", mine, allow_paths, shipped) == mine / "yours"
    assert all_models(mine, shipped) == ["default", "touch", "yours"]
    with pytest.raises(ModelError) as caught:
        resolve_model_dir("nowhere", mine, False, shipped)
    assert "available: touch, yours; shipped: default, touch" in str(caught.value)


def test_the_default_folders_are_the_per_user_folder_and_the_checkout_ships_its_models():
    assert user_folder() == Path(os.environ["XDG_DATA_HOME"]) / "antiphon"  # tests: a temporary one (conftest)
    assert available_models(DEFAULT_MODELS_DIR) == ["chorale", "default", "touch"]
    assert resolve_model_dir("touch", user_folder() / "models", allow_paths=False) == DEFAULT_MODELS_DIR / "touch"


# --------------------------------------------------------------------------- antiphon patches DIR


def test_patches_copies_every_client_patch_and_never_overwrites(tmp_path, capsys):
    dest = tmp_path / "my patches"
    assert main(["patches", str(dest)]) == 0
    shipped = sorted(p.relative_to(PATCHES_DIR) for p in PATCHES_DIR.rglob("*") if p.is_file())
    assert sorted(p.relative_to(dest) for p in dest.rglob("*") if p.is_file()) == shipped
    assert Path("pd/antiphon.pd") in shipped and Path("max/antiphon.maxpat") in shipped
    assert (dest / "pd" / "antiphon.pd").read_bytes() == (PATCHES_DIR / "pd" / "antiphon.pd").read_bytes()
    assert f"copied {len(shipped)} files into {dest}" in capsys.readouterr().out

    (dest / "pd" / "antiphon.pd").write_text("my edits")
    (dest / "max" / "antiphon.maxpat").unlink()
    assert main(["patches", str(dest)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "already exists" in err
    assert (dest / "pd" / "antiphon.pd").read_text() == "my edits"  # nothing touched
    assert not (dest / "max" / "antiphon.maxpat").exists()  # nothing copied either


# --------------------------------------------------------------------------- without the train extra


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


@pytest.mark.parametrize("argv", [["train", "--data", "missing.npz", "--name", "n"],
                                  ["learn", "--model", "default", "--log", "missing"]])
def test_training_commands_without_tensorflow_say_what_to_install_before_anything_else(argv, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    assert main(argv) == 1
    err = _one_line(capsys)
    assert err == (f"error: {argv[0]} needs the training libraries (tensorflow is not installed): "
                   'pip install "antiphon[train]"\n')


def test_a_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.npz"
    assert main(["synth", "--performances", "2", "--phrases", "2", "--out", str(data)]) == 0
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it now fails, as where it is not installed
    capsys.readouterr()
    assert main(["evaluate", "--model", "default", "--data", str(data), "--plot", str(tmp_path / "p.png")]) == 1
    assert 'evaluate needs the training libraries (matplotlib is not installed): pip install "antiphon[train]"' \
        in _one_line(capsys)


def test_the_command_line_and_run_s_wiring_load_no_training_library():
    """`antiphon run` parses every command's flags first: none of that may pull TensorFlow in (the stage has none)."""
    code = ("import sys; from server.cli import build_parser; build_parser().parse_args(['run']); import server.app; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TRAIN_ONLY!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
