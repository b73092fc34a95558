"""Command line: `python -m server <command>` (also installed as `antiphon`).

Each command is one function registered in COMMANDS; heavy imports (TensorFlow) happen
inside the commands that need them so `run` with a LiteRT model starts fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from server.config import as_flag, at_least, non_negative, positive
from server.learn.data import DT_MAX, DatasetError
from server.learn.shards import MIN_SHARD_EVENTS, is_sharded
from server.live.learning import DEFAULT_SECONDS as DEFAULT_LEARN_SECONDS
from server.live.settings import Settings
from server.model.files import check_model_name
from server.model.spec import DEFAULT_SIZE, SIZES, ModelError
from server.monitor import DEFAULT_HOST as MONITOR_HOST
from server.monitor import DEFAULT_PORT as MONITOR_PORT
from server.osc.namespace import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SEND_PORT
from server.places import user_models_dir

REPO = Path(__file__).resolve().parent.parent
SHOWN_SKIPPED = 20  # skipped MIDI files named one by one; the rest are counted

# Installed by the `train` extra only (pip install "antiphon[train]"): the stage runs without them.
TRAIN_ONLY = ("tensorflow", "tensorflow_probability", "tf_keras", "keras", "matplotlib")
TRAINING_COMMANDS = ("train", "learn")  # refused at once without TensorFlow, before any data is read

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str):
    """Register a command: the decorated function takes the parsed args; `args_fn` adds its flags."""

    def wrap(args_fn):
        def register(fn: Command) -> Command:
            COMMANDS[name] = (fn, args_fn, help)
            return fn

        return register

    return wrap


# --------------------------------------------------------------------------- argument checks


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`, refused before any work starts (the config's parser)."""
    return as_flag(at_least(low))


_positive_float = as_flag(positive)  # a finite number > 0
_non_negative_float = as_flag(non_negative)  # a finite number >= 0


def _output_file(text: str) -> Path:
    """An argparse type: where a file will be written; an existing folder is refused now, not after the work."""
    path = Path(text)
    if path.is_dir() and not is_sharded(path):  # a shard folder is a dataset, rewritten whole
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name such as {path / 'data.npz'}")
    return path


MODELS_DIR_HELP = "your own models: new ones are written here; a name is looked up here, then among the shipped ones"


def _models_dir_arg(p: argparse.ArgumentParser, what: str = MODELS_DIR_HELP) -> None:
    p.add_argument("--models-dir", type=Path, default=user_models_dir(), help=f"{what} (default {user_models_dir()})")


def _check_models_dir(models_dir: Path) -> None:
    """Refuse a --models-dir that cannot take a new model now, rather than after minutes of training."""
    existing = models_dir.absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent  # the folder is created on export, under its nearest existing parent
    if not existing.is_dir():
        raise ModelError(f"--models-dir {models_dir}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ModelError(f"--models-dir {models_dir}: {existing} is not writable")


# --------------------------------------------------------------------------- synth


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--performances", type=int, default=160, help="number of performances (default 160)")
    p.add_argument("--phrases", type=int, default=12, help="phrases per performance (default 12)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("datasets/synthetic.npz"))


@command("synth", "write a seeded synthetic gesture dataset")(_synth_args)
def cmd_synth(args: argparse.Namespace) -> int:
    from server.learn.data import save_dataset
    from server.learn.synth import synthetic_dataset

    ds = synthetic_dataset(args.performances, args.seed, args.phrases)
    save_dataset(ds, args.out)
    print(f"wrote {args.out}: {len(ds.events)} events in {len(ds.starts)} performances (sha256 {ds.sha256()[:12]})")
    return 0


# --------------------------------------------------------------------------- dataset


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", type=Path, help="performance logs (logs/*.csv) or folders of them")
    p.add_argument("--midi", nargs="+", action="extend", type=Path, metavar="PATH",
                   help="MIDI files (.mid, .midi) or folders of them: one performance per track, "
                        "dt from note onsets in seconds through the tempo map")
    p.add_argument("--merge-tracks", action="store_true",
                   help="with --midi: one performance per file, all tracks' notes merged in time")
    p.add_argument("--jobs", type=_int_at_least(1), default=1,
                   help="with --midi: parse files in this many processes (default 1); the dataset is the same")
    p.add_argument("--impsy", nargs="+", action="extend", type=Path, metavar="FILE.npz",
                   help="IMPSY dataset files (training-dataset-<D>d.npz): each performance in 'perfs', dt and D - 1 "
                        "values; read without unpickling anything but arrays of numbers")
    p.add_argument("--impsy-logs", nargs="+", action="extend", type=Path, metavar="PATH",
                   help="IMPSY performance logs (*-<D>d-mdrnn.log) or folders of them: one performance per log "
                        "from its 'interface' lines (with --include-model, its 'rnn' lines too)")
    p.add_argument("--include-model", action="store_true",
                   help="from logs, also the model's own events (default: the performer's only)")
    p.add_argument("--out", type=_output_file, default=None,
                   help="the dataset file (default datasets/performances.npz), or with --shard-events its folder "
                        "(default datasets/performances)")
    p.add_argument("--shard-events", type=_int_at_least(MIN_SHARD_EVENTS), default=None, metavar="N",
                   help="write a folder of shards of at most N events each (whole performances) with an index, for a "
                        "corpus larger than memory: train and evaluate read it a shard at a time")
    p.add_argument("--dt-max", type=_positive_float, default=DT_MAX, help=f"clip dt to this many seconds (default {DT_MAX:g})")


@command("dataset", "build a training dataset from performance logs, MIDI files and/or IMPSY's datasets and logs"
         )(_dataset_args)
def cmd_dataset(args: argparse.Namespace) -> int:
    from server.learn.data import Dataset, dataset_from_logs, save_dataset
    from server.learn.train import TrainConfig

    if not (args.paths or args.midi or args.impsy or args.impsy_logs):
        raise DatasetError("give performance logs or folders, and/or --midi PATH..., --impsy FILE.npz..., "
                           "--impsy-logs PATH...")
    perfs = dataset_from_logs(args.paths, args.dt_max, args.include_model).performances if args.paths else []
    if args.paths:
        what = "performer and model streams" if args.include_model else "performer streams"
        print(f"logs: {len(perfs)} {what} of two events or more")
    if args.midi:
        perfs += _midi_performances(args)
    perfs += _impsy_performances(args)
    window = TrainConfig().sequence_length  # a window is this many inputs and their next events
    short = sum(1 for p in perfs if 0 < len(p) < window + 1)
    padded = f" ({short} shorter than a training window of {window} events: they train padded)" if short else ""
    if args.shard_events is not None:
        from server.learn.shards import write_shards

        out = args.out or Path("datasets/performances")
        sharded = write_shards(perfs, out, args.shard_events)
        print(f"wrote {out}: {sharded.event_count} events of dt and {sharded.values} value(s) in "
              f"{sharded.performance_count} performances, {len(sharded.shards)} shard(s) of at most "
              f"{args.shard_events} events" + padded)
        return 0
    ds = Dataset.from_performances(perfs)
    out = args.out or Path("datasets/performances.npz")
    save_dataset(ds, out)
    print(f"wrote {out}: {len(ds.events)} events of dt and {ds.values} value(s) in {len(ds.starts)} performances"
          + padded)
    return 0


def _midi_performances(args: argparse.Namespace) -> list:
    """The performances of --midi, parsed by --jobs processes; each skipped file named (the first 20)."""
    from server.learn.importer import ImportProgress, import_midi

    got = import_midi(args.midi, args.dt_max, args.merge_tracks, args.jobs, ImportProgress())
    for f, reason, detail in got.skipped[:SHOWN_SKIPPED]:
        logging.getLogger(__name__).warning("skipped (%s) %s", reason, detail)
    if len(got.skipped) > SHOWN_SKIPPED:
        logging.getLogger(__name__).warning("... and %d more skipped", len(got.skipped) - SHOWN_SKIPPED)
    print(f"MIDI: {got.summary()}")
    return got.performances


def _impsy_performances(args: argparse.Namespace) -> list:
    """The performances of --impsy files and --impsy-logs, saying what was read and what was clipped."""
    from server.learn.impsy import read_impsy_dataset, read_impsy_logs

    reads = [(str(f), read_impsy_dataset(f, args.dt_max)) for f in args.impsy or []]
    if args.impsy_logs:
        reads.append(("IMPSY logs", read_impsy_logs(args.impsy_logs, args.dt_max, args.include_model)))
    perfs: list = []
    for what, got in reads:
        width = got.performances[0].shape[1]
        notes = [f"{got.empty} empty left out"] if got.empty else []
        if got.dt_clipped:
            notes.append(f"dt clipped to {args.dt_max:g} s in {got.dt_clipped} events")
        if got.values_clipped:
            notes.append(f"{got.values_clipped} values clipped to [0, 1]")
        print(f"{what}: {len(got.performances)} performances of dt and {width - 1} value(s), "
              f"{sum(len(p) for p in got.performances)} events" + (f" ({'; '.join(notes)})" if notes else ""))
        perfs += got.performances
    return perfs


# --------------------------------------------------------------------------- midi-ports


@command("midi-ports", "list the MIDI input and output ports (names for --midi-in / --midi-out)")(lambda p: None)
def cmd_midi_ports(args: argparse.Namespace) -> int:
    from server.midi.ports import MidiError, list_ports, open_backend, virtual_supported

    try:
        inputs, outputs = list_ports(open_backend())
    except MidiError as e:
        print(f"no MIDI ports: {e}")
        return 0
    for title, names in (("inputs (--midi-in)", inputs), ("outputs (--midi-out)", outputs)):
        print(f"MIDI {title}:")
        print("\n".join(f"  {n}" for n in names) or "  none")
    if virtual_supported():
        print("or create virtual ports 'Antiphon in' / 'Antiphon out' with --midi-virtual")
    return 0


# --------------------------------------------------------------------------- train / evaluate


def _train_args(p: argparse.ArgumentParser) -> None:
    from server.learn.music import INTERVALS
    from server.learn.train import LEARNING_RATE, TrainConfig

    d = TrainConfig()
    p.add_argument("--data", type=Path, required=True,
                   help="dataset .npz (from synth or dataset), or a folder of shards (dataset --shard-events)")
    p.add_argument("--size", choices=list(SIZES), default=DEFAULT_SIZE, help=_sizes_help())
    p.add_argument("--name", required=True, help="model folder name under --models-dir")
    _models_dir_arg(p)
    p.add_argument("--minutes", type=_positive_float, default=None,
                   help="time budget, export included (default: 2 minutes for a small dataset, up to 15 for a "
                        "large one); early stopping ends sooner when training has converged; Ctrl-C exports the "
                        "best model so far")
    p.add_argument("--init-from", metavar="MODEL", default=None,
                   help="fine-tune: start from this model (a name under --models-dir or a folder), keeping its "
                        "size and normalisation")
    p.add_argument("--mixtures", type=_int_at_least(1), default=d.mixtures,
                   help="mixture components (default: 10, or 30 when x is predicted as steps, see --intervals)")
    p.add_argument("--intervals", choices=INTERVALS, default=d.intervals,
                   help="yes: predict x as the step from the previous event's x (a melodic interval, for notes; "
                        "recorded in model.json); no (default): x itself")
    p.add_argument("--dropout", type=float, default=d.dropout, help=f"dropout between layers (default {d.dropout})")
    p.add_argument("--dt-offset", type=_positive_float, default=d.dt_offset,
                   help=f"seconds in log(dt + offset) (default {d.dt_offset})")
    p.add_argument("--epochs", type=_int_at_least(1), default=d.epochs, help="at most this many epochs")
    p.add_argument("--patience", type=_int_at_least(0), default=d.patience,
                   help="early stopping: epochs without a better held-out figure before training ends, unless "
                        "the figure is still trending better (the last third of them better than the third before)")
    p.add_argument("--data-source", default="", help="where the data came from (recorded in model.json)")
    p.add_argument("--data-licence", default="", help="the data's licence and copyright notice (recorded in model.json)")
    p.add_argument("--seed", type=_int_at_least(0), default=d.seed)
    p.add_argument("--batch-size", type=_int_at_least(1), default=d.batch_size)
    p.add_argument("--learning-rate", type=_positive_float, default=None,
                   help=f"Adam's rate at the start (default {LEARNING_RATE}, also on --workers); it settles to 5 %% "
                        "over the second half of --minutes and halves when the held-out figure stalls")
    p.add_argument("--sequence-length", type=_int_at_least(2), default=d.sequence_length,
                   help="training window in events")
    p.add_argument("--no-report", action="store_true", help="skip report.png")
    p.add_argument("--workers", default=None, metavar="HOST:PORT,...",
                   help="train on several processes or machines (tf.distribute MultiWorkerMirroredStrategy): "
                        "the same list and command on every worker, each with its own --worker-index; "
                        "TF_CONFIG is read when this is not given")
    p.add_argument("--worker-index", type=_int_at_least(0), default=None, metavar="N",
                   help="this worker's place in --workers; 0, the chief, writes the model folder")


def _sizes_help() -> str:
    return "model size: " + ", ".join(f"{k} = {u}x{l}" for k, (u, l) in SIZES.items()) + f" (default {DEFAULT_SIZE})"


@command("train", "train a model on a dataset and export it to <models-dir>/<name>")(_train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from server.learn.shards import open_dataset
    from server.learn.train import TrainConfig, train
    from server.model.files import resolve_model_dir

    try:
        check_model_name(args.name)
    except ValueError as e:
        raise ModelError(f"--name: {e}") from None
    from server.learn.distribute import ClusterError, parse_cluster

    try:
        cluster = parse_cluster(args.workers, args.worker_index)
    except ValueError as e:
        return _fail(str(e))
    if cluster is not None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the runtime logs every RPC; our lines say what matters
    _check_models_dir(args.models_dir)
    cfg = TrainConfig(
        cluster=cluster,
        size=args.size,
        mixtures=args.mixtures,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        sequence_length=args.sequence_length,
        stride=max(1, args.sequence_length // 5),
        report=not args.no_report,
        minutes=args.minutes,
        dropout=args.dropout,
        dt_offset=args.dt_offset,
        intervals=args.intervals,
        init_from=None if args.init_from is None else resolve_model_dir(args.init_from, args.models_dir, allow_paths=True),
        data={k: v for k, v in (("source", args.data_source), ("licence", args.data_licence)) if v},
    )
    try:
        result = train(open_dataset(args.data), args.name, args.models_dir, cfg)
    except ClusterError as e:
        _fail(str(e))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # TensorFlow's shutdown would wait for the lost worker; there is nothing left to clean up
    return 0 if result.folder is not None else 1


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name under --models-dir, or a folder path")
    p.add_argument("--data", type=Path, required=True)
    _models_dir_arg(p)
    p.add_argument("--music", action="store_true",
                   help="also let the model play (seeded, from a zero state and from held-out openings) and compare "
                        "it with the data: intervals, pitches, pitch classes and rhythm for notes; moves and dt for "
                        "gestures")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="--music: the sampler's seed (default 0)")
    p.add_argument("--temperature", type=_non_negative_float, default=Settings.temperature,
                   help=f"--music: mixture-weight temperature (default {Settings.temperature:g}, as `run`)")
    p.add_argument("--sigma-temperature", type=_non_negative_float, default=None,
                   help="--music: scale temperature (default: the model's own, as `run`)")
    p.add_argument("--calibrate", action="store_true",
                   help="find the scale temperature at which the model plays most like --data (its held-out part "
                        "when it is the training data) and write it into model.json as the model's own, as `train` "
                        "does; for models trained before it did")
    p.add_argument("--plot", type=_output_file, default=None, metavar="FILE.png",
                   help="--music: also draw the histograms, data beside model, into this PNG")


@command("evaluate", "NLL per event of a dataset under a model (original units; dequantised where the data is on a grid)")(_evaluate_args)
def cmd_evaluate(args: argparse.Namespace) -> int:
    from server.learn.evaluate import score
    from server.learn.shards import ShardedDataset, open_dataset
    from server.learn.streaming import ShardedPart
    from server.model.files import resolve_model_dir
    from server.model.engines import open_step, read_for

    folder = resolve_model_dir(args.model, args.models_dir, allow_paths=True)
    model = read_for(folder)
    ds = open_dataset(args.data)
    if ds.values != model.info.spec.values:
        raise DatasetError(f"{args.data}: events of dt and {ds.values} value(s), but {folder.name} takes "
                           f"{model.info.spec.values}; evaluate it on data of its own controller")
    step, _ = open_step(model)
    s = score(step, model.info, ShardedPart(ds, frozenset()) if isinstance(ds, ShardedDataset) else ds)
    norm = model.info.normaliser
    print(f"{folder.name}: {s.dequantised:.4f} nats per event over {s.events} events in {s.performances} performances")
    if norm.gridded:
        print(f"  dequantised (each quantised coordinate integrated over its grid cell); raw density at the points: {s.raw:.4f}")
    print(f"  {norm.describe()}")
    if args.calibrate:
        model = _calibrate(folder, model, ds, args.seed)
    if args.music or args.plot is not None:
        _print_music(model, ds, args)
    return 0


def _calibrate(folder: Path, model, ds, seed: int):
    """`evaluate --calibrate`: the model's own sigma_temperature into its model.json; returns the model re-read."""
    from server.learn.calibrate import calibrate, write_sampling
    from server.learn.evaluate import held_out
    from server.model.engines import read_for
    from server.model.predictor import Predictor

    data, which = held_out(ds, model.info)
    found = calibrate(Predictor(model), data, seed)
    write_sampling(folder, {**model.info.sampling, **found.record(seed)})
    print(f"calibrated on {which}: sigma_temperature {found.sigma_temperature:g} (shape distance {found.distance:.3f}, "
          f"{found.tried.get(1.0, float('nan')):.3f} at 1), written to {folder / 'model.json'}")
    return read_for(folder)


def _print_music(model, ds, args: argparse.Namespace) -> None:
    from server.learn.evaluate import held_out, music_lines, music_report
    from server.model.predictor import Predictor

    data, which = held_out(ds, model.info)
    sigma = model.info.sigma_temperature if args.sigma_temperature is None else args.sigma_temperature
    report = music_report(Predictor(model), data, args.seed, args.temperature, sigma)
    kind = "notes (x = pitch/127)" if report.notes else "gestures"
    print(f"music, {kind}: the model playing at temperature {args.temperature:g}, sigma_temperature "
          f"{sigma:g}, seed {args.seed}, beside {which} (distances: 0 = the same)")
    for line in music_lines(report):
        print(f"  {line}")
    if args.plot is not None:
        from server.learn.report import write_music_plot

        print(f"wrote {write_music_plot(report, args.plot)}")


# --------------------------------------------------------------------------- run


def _run_args(p: argparse.ArgumentParser) -> None:
    from server.config import add_run_arguments

    add_run_arguments(p)


@command("run", f"serve a model over OSC (defaults: the shipped model default, listen {DEFAULT_HOST}:{DEFAULT_PORT}, "
                f"send to :{DEFAULT_SEND_PORT})")(_run_args)
def cmd_run(args: argparse.Namespace) -> int:
    from server.app import StartupError, serve
    from server.config import ConfigError, resolve_run_config

    try:
        return serve(resolve_run_config(args))
    except (ConfigError, StartupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------- learn


def _learn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the model to fine-tune: a name under --models-dir, or a folder")
    p.add_argument("--log", nargs="+", type=Path, required=True, metavar="PATH",
                   help="performance logs (logs/*.csv) or folders of them: the performer's events are learnt")
    p.add_argument("--seconds", type=_positive_float, default=DEFAULT_LEARN_SECONDS,
                   help=f"time budget (default {DEFAULT_LEARN_SECONDS:g})")
    p.add_argument("--name", default=None, help="the new model's folder name (default: <model>-learn-<time>)")
    _models_dir_arg(p)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--until", type=float, default=None, metavar="UNIX_TIME",
                   help="only the events logged up to this time (a server passes when /learn was asked)")
    p.add_argument("--json", action="store_true", help="progress and result as JSON lines (what a server reads)")
    p.add_argument("--background", action="store_true",
                   help="lower priority and one thread, so a server on this machine keeps a core to itself")


@command("learn", "fine-tune a model on the performer's events in performance logs; kept only if it does better "
                  "on the last phrases held out")(_learn_args)
def cmd_learn(args: argparse.Namespace) -> int:
    import json

    from server.learn.data import log_streams
    from server.live.learning import learned_name
    from server.model.files import resolve_model_dir

    if args.background:
        _background()
    folder = resolve_model_dir(args.model, args.models_dir, allow_paths=True)
    name = args.name or learned_name(folder.name)
    try:
        check_model_name(name)
    except ValueError as e:
        raise ModelError(f"--name: {e}") from None

    def emit(message: dict) -> None:
        print(json.dumps(message), flush=True)

    def progress(fraction: float, nll: float) -> None:
        if args.json:
            emit({"progress": round(fraction, 4), "heldout_nll": round(nll, 4)})
        else:
            print(f"{fraction:6.1%}  held-out NLL {nll:.3f} nats/event", flush=True)

    # Ctrl-C (and a server's /learn/stop, which sends SIGINT) ends training at the next batch and
    # still judges the best epoch: a flag read between batches, never an exception mid-Keras
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        from server.learn.finetune import fine_tune

        streams = log_streams(args.log, ("performer",), until=args.until)
        result = fine_tune(folder, streams, args.seconds, args.models_dir, name, progress,
                           lineage={"session_logs": [str(p) for p in args.log]}, seed=args.seed, stop=stop)
    except (DatasetError, ModelError) as e:
        if args.json:
            emit({"error": str(e)})
            return 1
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if args.json:
        emit({"result": {"model": result.model, "nll_before": result.nll_before, "nll_after": result.nll_after,
                         "better": result.better, "seconds": round(result.seconds, 1)}})
    else:
        verdict = f"wrote {args.models_dir / result.model}" if result.better else f"kept {folder.name} (no better)"
        print(f"{verdict}: held-out NLL {result.nll_before:.3f} -> {result.nll_after:.3f} nats/event "
              f"({result.events_train} events learnt, {result.events_held_out} held out, {result.seconds:.0f} s)")
    return 0


def _background() -> None:
    """Lower this process's priority and keep TensorFlow to one thread (before it is imported)."""
    import os

    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = "1"
    yield_to_the_music()
    from server.model.network import tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


# --------------------------------------------------------------------------- numpy-step


def _numpy_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name under --models-dir, or a folder path")
    _models_dir_arg(p)


@command("numpy-step", "add step.npz (the step without LiteRT or TensorFlow) to a model exported before it existed")(
    _numpy_step_args)
def cmd_numpy_step(args: argparse.Namespace) -> int:
    from server.model.export import add_step_npz
    from server.model.files import resolve_model_dir

    folder = resolve_model_dir(args.model, args.models_dir, allow_paths=True)
    diff = add_step_npz(folder)
    print(f"wrote {folder / 'step.npz'} (matches model.keras within {diff:.2g} over 200 steps)")
    return 0


# --------------------------------------------------------------------------- bench


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model name under --models-dir, or a folder path")
    _models_dir_arg(p)
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the JSON results")
    p.add_argument("--quick", action="store_true", help="fewer steps and shorter runs (a smoke test)")


@command("bench", "measure step latency, OSC round trip, idle CPU and start-up time")(_bench_args)
def cmd_bench(args: argparse.Namespace) -> int:
    from server.tools.bench import run_bench

    run_bench(args.model, args.models_dir, args.out, args.quick)
    return 0


# --------------------------------------------------------------------------- soak


def _soak_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=60.0, help="how long to play (default 60)")
    p.add_argument("--rate", type=float, default=1000.0, help="/gesture messages per second (default 1000)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per reported window (default 10)")
    p.add_argument("--model", default="default", help="model name under --models-dir, or a folder path")
    _models_dir_arg(p)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")


@command("soak", "play a server over loopback for a long run: latency percentiles and RSS per time window")(_soak_args)
def cmd_soak(args: argparse.Namespace) -> int:
    import json

    from server.model.files import resolve_model_dir
    from server.tools.soak import format_soak, run_soak, soak_ok

    folder = resolve_model_dir(args.model, args.models_dir, allow_paths=True)
    result = run_soak(str(folder), args.seconds, args.rate, args.window)
    print(format_soak(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if soak_ok(result) else 1


# --------------------------------------------------------------------------- monitor


def _monitor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=MONITOR_HOST, help=f"HTTP interface (default {MONITOR_HOST}: this machine only)")
    p.add_argument("--port", type=_int_at_least(0), default=MONITOR_PORT,
                   help=f"HTTP port (default {MONITOR_PORT}; 0 picks a free one)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME", type=_host_name,
                   help="a name or address browsers may use to reach the monitor (repeat for several); "
                        "127.0.0.1, localhost, [::1] and --host (unless 0.0.0.0 or ::) are always allowed, "
                        "any other Host header is refused (DNS rebinding)")
    p.add_argument("--server", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
                   help=f"HOST:PORT of the Antiphon server (default {DEFAULT_HOST}:{DEFAULT_PORT})")
    _models_dir_arg(p, "the server's models_dir (for the model menu, with the shipped models)")


def yield_to_the_music() -> None:
    """Run this process only when the CPU would otherwise idle: a display must never delay an answer.

    Linux: SCHED_IDLE, which any waking server preempts at once; elsewhere the lowest nice.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
        return
    except (AttributeError, OSError):
        pass
    try:
        os.nice(19)
    except (AttributeError, OSError):
        pass


def _host_name(text: str) -> str:
    from server.monitor.access import host_name

    try:
        return host_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@command("monitor", f"serve the web monitor (its own process) on http://{MONITOR_HOST}:{MONITOR_PORT}/, "
                    "talking OSC to a running server")(_monitor_args)
def cmd_monitor(args: argparse.Namespace) -> int:
    import asyncio

    from server.monitor.app import serve
    from server.monitor.bridge import parse_server

    try:
        server = parse_server(args.server)
    except ValueError as e:
        return _fail(f"--server: {e}")
    yield_to_the_music()
    asyncio.run(serve(args.host, args.port, server, args.models_dir, args.allow_host))
    return 0


# --------------------------------------------------------------------------- patches


def _patches_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, metavar="DIR", help="the folder to copy them into (created if missing)")


@command("patches", "copy the client patches (Pd, Max, SuperCollider) into a folder, to open them from there"
         )(_patches_args)
def cmd_patches(args: argparse.Namespace) -> int:
    from server.places import copy_patches

    written = copy_patches(args.dir)
    print(f"copied {len(written)} files into {args.dir}: open pd/antiphon.pd (Pure Data), max/antiphon.maxpat (Max) "
          f"or supercollider/antiphon.scd (SuperCollider); README.md there says how")
    return 0


# --------------------------------------------------------------------------- docs


def _docs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose README.md and docs/ to regenerate")
    p.add_argument("--check", action="store_true", help="exit 1 if the generated sections are stale")


@command("docs", "regenerate the sections of README.md and docs/ made from the code (OSC namespace, modes, sizes, "
                 "config, the table of contents)")(_docs_args)
def cmd_docs(args: argparse.Namespace) -> int:
    from server.tools.docs import update

    stale = update(args.repo, args.check, {name: help for name, (_, _, help) in COMMANDS.items()})
    if not args.check or not stale:
        return 0
    print(f"stale: {', '.join(str(p) for p in stale)}: run python -m server docs", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="antiphon", description="Antiphon: a predictive performance server.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, args_fn, help) in COMMANDS.items():
        args_fn(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; any failure ends as one `error: ...` line on stderr and exit 1, never a traceback.

    Expected failures (a bad file, model or dataset) carry a message naming the file and
    the fix. Anything else ends the same way, with its exception type; `-v` shows the traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        if args.command in TRAINING_COMMANDS and importlib.util.find_spec("tensorflow") is None:
            raise ModuleNotFoundError("no TensorFlow", name="tensorflow")
        return COMMANDS[args.command][0](args)
    except (ModelError, DatasetError) as e:
        return _fail(str(e))
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in TRAIN_ONLY:
            return _fail(f"{args.command} needs the training libraries ({e.name} is not installed): "
                         f'pip install "antiphon[train]"')
        return _unexpected(e, args)
    except OSError as e:
        return _fail(_describe_os_error(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        return _unexpected(e, args)


def _unexpected(e: Exception, args: argparse.Namespace) -> int:
    logging.getLogger(__name__).debug("%s failed", args.command, exc_info=True)
    hint = "" if args.verbose else "; -v shows the traceback"
    return _fail(f"{e or 'failed'} ({type(e).__name__} in {args.command}{hint})")


def _fail(message: str) -> int:
    """Print one `error:` line (newlines in the message folded) and return the exit code 1."""
    print("error: " + " ".join(message.split("\n")), file=sys.stderr)
    return 1


def _describe_os_error(e: OSError) -> str:
    """`path: reason` for an OSError, as a user would say it."""
    if e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return e.strerror or str(e)
