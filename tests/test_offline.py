"""Offline commands meet bad input as a user would make it: one clear `error:` line and exit 1, never a traceback.

Every case runs the real command line (`server.cli.main`, and a subprocess for the
process as a whole) on real files: damaged logs, MIDI files, datasets and configs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mido
import numpy as np
import pytest

from server.cli import main
from tests.live import REPO

ROWS = "".join(f"{t}.0,performer,0.{t},0.5\n" for t in range(1, 9))  # x = 0.1 ... 0.8


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit code and stderr of one command, as the shell would see them (argparse exits with 2)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, *fragments: str) -> None:
    """stderr ends in exactly one `error:` line holding every fragment, with no traceback before it."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def write_midi(path: Path, division: int = 96, notes: int = 5) -> Path:
    """A type 0 MIDI file; a negative `division` is written into the header as a SMPTE division."""
    mid = mido.MidiFile(type=0, ticks_per_beat=96)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    for i in range(notes):
        track.append(mido.Message("note_on", note=60 + i, velocity=80, time=48))
    mid.save(path)
    if division != 96:
        data = bytearray(path.read_bytes())
        data[12:14] = division.to_bytes(2, "big", signed=True)  # MThd: length 6, format, tracks, division
        path.write_bytes(bytes(data))
    return path


@pytest.fixture
def dataset_file(tmp_path: Path) -> Path:
    """A valid dataset, for commands whose other arguments are the problem."""
    assert main(["synth", "--performances", "4", "--phrases", "2", "--out", str(tmp_path / "ok.npz")]) == 0
    return tmp_path / "ok.npz"


# ----------------------------------------------------------------------------- logs


def test_a_log_field_over_the_csv_limit_is_named_with_its_line(tmp_path, capsys):
    log = tmp_path / "huge.csv"
    log.write_text("time,source,x,y\n1.0,performer,0.5,0.5\n2.0,performer," + "9" * 140_000 + ",0.5\n" + ROWS)
    code, err = cli(capsys, "dataset", str(log), "--out", str(tmp_path / "d.npz"))
    assert code == 1
    assert_one_error_line(err, str(log), "line 3", "longer than")
    assert not (tmp_path / "d.npz").exists()


def test_rows_after_an_unterminated_quote_are_still_read(tmp_path, capsys, caplog):
    log = tmp_path / "quote.csv"
    log.write_text('time,source,x,y\n0.5,performer,0.05,0.5\n0.7,"performer,0.5,0.5\n' + ROWS)
    with caplog.at_level(logging.WARNING):
        code, err = cli(capsys, "dataset", str(log), "--out", str(tmp_path / "d.npz"))
    assert code == 0, err
    with np.load(tmp_path / "d.npz") as z:
        np.testing.assert_allclose(z["events"][:, 1], [0.05] + [t / 10 for t in range(1, 9)], atol=1e-6)
    assert any(str(log) in r.getMessage() and "line 3" in r.getMessage() for r in caplog.records), caplog.text


def test_a_bad_log_in_a_folder_is_skipped_but_a_bad_log_named_alone_is_an_error(tmp_path, capsys, caplog):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.csv").write_text("time,source,x,y\n" + ROWS)
    (logs / "empty.csv").write_text("")  # a run that failed to start
    (logs / "folder.csv").mkdir()  # not a file at all
    with caplog.at_level(logging.WARNING):
        code, err = cli(capsys, "dataset", str(logs), "--out", str(tmp_path / "d.npz"))
    assert code == 0, err
    assert any("empty.csv" in r.getMessage() for r in caplog.records)
    code, err = cli(capsys, "dataset", str(logs / "empty.csv"), "--out", str(tmp_path / "d.npz"))
    assert code == 1
    assert_one_error_line(err, str(logs / "empty.csv"), "empty")


# ----------------------------------------------------------------------------- MIDI


def test_a_midi_file_with_zero_ticks_per_smpte_frame_is_skipped_by_name(tmp_path, capsys, caplog):
    bad = write_midi(tmp_path / "smpte.mid", division=-(25 << 8))  # 25 frames per second, 0 ticks per frame
    good = write_midi(tmp_path / "good.mid")
    with caplog.at_level(logging.WARNING):
        code, err = cli(capsys, "dataset", "--midi", str(bad), str(good), "--out", str(tmp_path / "d.npz"))
    assert code == 0, err
    with np.load(tmp_path / "d.npz") as z:
        assert len(z["events"]) == 5  # the good file's notes
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(bad) in w and "ticks per frame" in w for w in warnings), warnings
    code, err = cli(capsys, "dataset", "--midi", str(bad), "--out", str(tmp_path / "d.npz"))
    assert code == 1
    assert_one_error_line(err, str(bad), "SMPTE")


# ----------------------------------------------------------------------------- datasets


def _npy_renamed(path: Path) -> str:
    np.save(path.with_suffix(".npy"), np.zeros((4, 3), np.float32))
    path.with_suffix(".npy").rename(path)
    return ".npy"


def _truncated_zip(path: Path) -> str:
    np.savez(path, events=np.zeros((10, 3), np.float32), starts=np.array([0, 5], np.int64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "damaged"


def _empty(path: Path) -> str:
    path.write_bytes(b"")
    return "empty"


def _folder(path: Path) -> str:
    path.mkdir()
    return "folder"


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("make", [_npy_renamed, _truncated_zip, _empty, _folder], ids=lambda f: f.__name__[1:])
def test_a_file_that_is_not_a_dataset_is_named(tmp_path, capsys, command: str, make: Callable[[Path], str]):
    data = tmp_path / "data.npz"
    problem = make(data)
    args = ["--name", "m", "--models-dir", str(tmp_path / "models")] if command == "train" else ["--model", "default"]
    code, err = cli(capsys, command, "--data", str(data), *args)
    assert code == 1
    assert_one_error_line(err, str(data), problem)


# ----------------------------------------------------------------------------- train arguments


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--epochs", "0", "must be >= 1"),
        ("--batch-size", "0", "must be >= 1"),
        ("--sequence-length", "1", "must be >= 2"),
        ("--learning-rate", "nan", "must be a finite number > 0"),
        ("--mixtures", "-2", "must be >= 1"),
    ],
)
def test_train_refuses_numbers_that_cannot_train(tmp_path, capsys, flag: str, value: str, message: str):
    code, err = cli(capsys, "train", "--data", str(tmp_path / "missing.npz"), "--name", "m",
                    "--models-dir", str(tmp_path), flag, value)
    assert code == 2
    assert "Traceback" not in err and f"argument {flag}: {message}" in err.splitlines()[-1]


@pytest.mark.parametrize("name", ["ok\n", "a\nb"])  # 9ce4095's `^...$` let "ok\n" through
def test_train_refuses_a_name_the_one_name_rule_refuses(tmp_path, capsys, name: str):
    code, err = cli(capsys, "train", "--data", str(tmp_path / "missing.npz"), "--name", name,
                    "--models-dir", str(tmp_path / "models"))
    assert code == 1
    assert_one_error_line(err, "--name", "invalid model name")
    assert not (tmp_path / "models").exists()


def test_train_refuses_a_models_dir_it_could_not_write_before_training(tmp_path, capsys, dataset_file):
    blocker = tmp_path / "models"
    blocker.write_text("a file")
    code, err = cli(capsys, "train", "--data", str(dataset_file), "--name", "m", "--models-dir", str(blocker / "sub"))
    assert code == 1
    assert_one_error_line(err, str(blocker), "not a folder")


def test_dataset_refuses_an_output_that_is_a_folder_before_reading(tmp_path, capsys):
    log = tmp_path / "a.csv"
    log.write_text("time,source,x,y\n" + ROWS)
    code, err = cli(capsys, "dataset", str(log), "--out", str(tmp_path))
    assert code == 2 and "Traceback" not in err and "is a folder" in err.splitlines()[-1]


def test_synth_refuses_an_empty_corpus(tmp_path, capsys):
    code, err = cli(capsys, "synth", "--performances", "0", "--out", str(tmp_path / "s.npz"))
    assert code == 1
    assert_one_error_line(err, "at least one performance")


# ----------------------------------------------------------------------------- configs


def _deep(n: int) -> bytes:
    return b"a = " + b"[" * n + b"]" * n + b"\n"


CONFIGS: dict[str, tuple[bytes, str]] = {
    "latin-1": ("log_dir = 'caf\xe9'\n".encode("latin-1"), "not UTF-8"),
    "binary": (bytes(range(256)) * 4, "not UTF-8"),
    "nested": (_deep(5000), "nested too deeply"),
    "allow-bool": (b"allow = [true]\n", "allow"),
    "allow-number": (b"allow = [10]\n", "allow"),
    "nul-in-path": (b'log_dir = "a\\u0000b"\n', "log_dir"),
    "nul-in-host": (b'host = "local\\u0000host"\n', "host"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_a_config_that_cannot_be_used_is_named(tmp_path, capsys, case: str):
    text, problem = CONFIGS[case]
    config = tmp_path / "antiphon.toml"
    config.write_bytes(text)
    # an empty models folder: were the config accepted, the run would end at once, without a model
    (tmp_path / "models").mkdir()
    code, err = cli(capsys, "run", "--config", str(config), "--port", "0", "--models-dir", str(tmp_path / "models"),
                    "--log-dir", str(tmp_path / "logs"))
    assert code == 1
    assert_one_error_line(err, str(config), problem)


def without_root_override(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`cli`, but as root in a child process without the capabilities that let root read any file.

    Root ignores file permissions through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; `setpriv`
    drops them from the child's bounding set, so an unreadable file is unreadable to it too
    (CI runs as root, and a skipped test is no test).
    """
    if os.geteuid() != 0:
        return cli(capsys, *argv)
    out = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                          "server", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stderr


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX permissions")
def test_unreadable_inputs_are_named(tmp_path, capsys):
    config, log = tmp_path / "antiphon.toml", tmp_path / "a.csv"
    config.write_text("port = 0\n")
    log.write_text("time,source,x,y\n" + ROWS)
    config.chmod(0)
    log.chmod(0)
    code, err = without_root_override(capsys, "run", "--config", str(config))
    assert code == 1
    assert_one_error_line(err, str(config), "ermission")
    code, err = without_root_override(capsys, "dataset", str(log), "--out", str(tmp_path / "d.npz"))
    assert code == 1
    assert_one_error_line(err, str(log), "ermission")


# ----------------------------------------------------------------------------- the process as a user runs it


def test_the_process_prints_one_line_and_exits_1(tmp_path):
    log, config, data = tmp_path / "huge.csv", tmp_path / "deep.toml", tmp_path / "data.npz"
    log.write_text("time,source,x,y\n1.0,performer," + "9" * 200_000 + ",0.5\n")
    config.write_bytes(_deep(5000))
    _npy_renamed(data)
    for argv, name in (
        (["dataset", str(log), "--out", str(tmp_path / "d.npz")], log),
        (["run", "--config", str(config)], config),
        (["run", "--config", str(tmp_path)], tmp_path),  # a folder where the config file should be
        (["train", "--data", str(data), "--name", "m", "--models-dir", str(tmp_path / "m")], data),
    ):
        result = subprocess.run([sys.executable, "-m", "server", *argv], cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1, result.stderr
        assert_one_error_line(result.stderr, str(name))
