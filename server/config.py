"""Run configuration: defaults < TOML file (`--config`) < command-line flags, validated once.

Every key is declared once, as a `RunConfig` field whose metadata holds its help text,
metavar and parser. The argparse flags, the TOML reader, the validation and the
docs/commands.md reference (`config_reference_markdown`) are all generated from those fields,
so adding a key (MIDI ports, say) is one field. Relative paths in a TOML file are
relative to that file; on the command line, to the working directory.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from server.live.engine import DEFAULT_MAX_RATE, MAX_LOOKAHEAD, Settings
from server.live.modes import MODE_NAMES, Mode, parse_mode
from server.live.voices import (DEFAULT_MAX_VOICES, DEFAULT_MAX_VOICES_PER_SENDER, DEFAULT_VOICE_TIMEOUT, MAX_VOICE_LIMIT,
                                VOICE_POLICIES, VoicePolicy, parse_voice_policy)
from server.midi import mapping as midimap
from server.model.engines import BACKENDS
from server.places import user_logs_dir, user_models_dir
from server.monitor import DEFAULT_PORT as MONITOR_PORT
from server.osc.namespace import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SEND_PORT
from server.osc.output import MAX_DESTINATIONS
from server.osc.oscquery import DEFAULT_OSCQUERY_PORT
from server.osc.allow import Network

Endpoint = tuple[str, int]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag or file key and says why."""


# --- value parsers: accept a flag's string or a TOML value, return the canonical value ---


def _number(raw: object) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"expected a number, got {raw!r}")
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    else:
        raise ValueError(f"expected a number, got {type(raw).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {raw!r}")
    return value


def _non_negative(raw: object) -> float:
    value = _number(raw)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value:g}")
    return value


def _positive(raw: object) -> float:
    value = _number(raw)
    if value <= 0:
        raise ValueError(f"must be > 0, got {value:g}")
    return value


def _integer(raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip(), 10)
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {raw!r}")


def at_least(low: int) -> Callable[[object], int]:
    """A parser for an integer >= `low`."""

    def parse(raw: object) -> int:
        value = _integer(raw)
        if value < low:
            raise ValueError(f"must be >= {low}, got {value}")
        return value

    return parse


def positive(raw: object) -> float:
    """A finite number > 0."""
    try:
        return _positive(raw)
    except ValueError:
        raise ValueError(f"must be a finite number > 0, got {raw!r}") from None


def non_negative(raw: object) -> float:
    """A finite number >= 0."""
    try:
        return _non_negative(raw)
    except ValueError:
        raise ValueError(f"must be a finite number >= 0, got {raw!r}") from None


def as_flag(parse: Callable[[object], Any]) -> Callable[[str], Any]:
    """An argparse `type` from one of these parsers: every command's flags follow the same rules."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its messages
    return convert


def _int_in(low: int, high: int, what: str, note: str = "") -> Callable[[object], int]:
    """A parser for an integer in [low, high]; `what` and `note` word the error."""

    def parse(raw: object) -> int:
        value = _integer(raw)
        if not low <= value <= high:
            raise ValueError(f"{what} must be {low}-{high}{note}, got {value}")
        return value

    return parse


def _cc_list(raw: object) -> tuple[int, ...]:
    """`midi_cc`: control change numbers, one per value, as `1,2,7,10` (a flag) or a TOML list."""
    items = raw.split(",") if isinstance(raw, str) else [raw] if isinstance(raw, int) else raw
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"expected control change numbers like 1,2,7,10, got {raw!r}")
    number = _int_in(0, 127, "a control change number")
    return midimap.check_ccs(tuple(number(item) for item in items))


def _port(raw: object, low: int = 0) -> int:
    return _int_in(low, 65535, "port")(raw)


def _text(what: str) -> Callable[[object], str]:
    """A parser for a non-empty string (surrounding space stripped)."""

    def parse(raw: object) -> str:
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"expected {what}, got {raw!r}")
        return raw.strip()

    return parse


def _switch(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    word = raw.strip().lower() if isinstance(raw, str) else None
    if word in ("1", "yes", "true", "on"):
        return True
    if word in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected yes or no, got {raw!r}")


def _choice(names: tuple[str, ...]) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        if not isinstance(raw, str) or raw.strip().lower() not in names:
            raise ValueError(f"expected one of {', '.join(names)}, got {raw!r}")
        return raw.strip().lower()

    return parse


def _duration(raw: object) -> float | None:
    """Seconds > 0, or "auto" (None)."""
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return None
    try:
        return _positive(raw)
    except ValueError:
        raise ValueError(f"expected seconds > 0 or 'auto', got {raw!r}") from None


def _seed(raw: object) -> int:
    value = _integer(raw)
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")
    return value


_model = _text("a model name or folder path")  # a name under models_dir, or (flag, file) a folder path


def _host(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip() or any(c.isspace() or not c.isprintable() for c in raw.strip()):
        raise ValueError(f"expected a host name or IP address, got {raw!r}")
    return raw.strip()


def _mode(raw: object) -> Mode:
    if not isinstance(raw, str):
        raise ValueError(f"expected one of {', '.join(MODE_NAMES)}, got {raw!r}")
    return parse_mode(raw)


def _voices(raw: object) -> VoicePolicy:
    if not isinstance(raw, str):
        raise ValueError(f"expected one of {', '.join(VOICE_POLICIES)}, got {raw!r}")
    return parse_voice_policy(raw)


def _lookahead(raw: object) -> float:
    value = _non_negative(raw)
    if value > MAX_LOOKAHEAD:
        raise ValueError(f"must be at most {MAX_LOOKAHEAD:g} seconds, got {value:g}")
    return value


def _path(raw: object) -> Path:
    if not isinstance(raw, (str, Path)) or not str(raw) or "\0" in str(raw):
        raise ValueError(f"expected a path, got {raw!r}")
    return Path(raw).expanduser()


def _endpoint(raw: object) -> Endpoint:
    """`HOST:PORT` or `[IPv6]:PORT` (or a (host, port) pair) -> (host, port)."""
    if isinstance(raw, (tuple, list)) and len(raw) == 2:
        host, port = raw
    elif isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or not rest.startswith(":"):
                raise ValueError(f"expected [IPv6]:PORT, got {raw!r}")
            port = rest[1:]
        else:
            host, colon, port = text.rpartition(":")
            if not colon:
                raise ValueError(f"expected HOST:PORT, got {raw!r}")
            if ":" in host:
                raise ValueError(f"write an IPv6 address as [ADDRESS]:PORT, got {raw!r}")
    else:
        raise ValueError(f"expected HOST:PORT, got {raw!r}")
    return (_host(host), _port(port, low=1))


def _network(raw: object) -> Network:
    if not isinstance(raw, str):  # ip_network(True) would be 0.0.0.1/32: a typo must not silently deny everyone
        raise ValueError(f"expected an address or CIDR network like 192.168.1.0/24 (a string), got {raw!r}")
    try:
        return ipaddress.ip_network(raw, strict=False)  # type: ignore[arg-type]  # 10.1.2.3/8 means 10.0.0.0/8
    except (ValueError, TypeError):
        raise ValueError(f"expected an address or CIDR network like 192.168.1.0/24, got {raw!r}") from None


def _each(parse: Callable[[object], Any]) -> Callable[[object], tuple[Any, ...]]:
    """Parse a list (repeated flag or TOML array; a single TOML string counts as one item)."""

    def parse_all(raw: object) -> tuple[Any, ...]:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"expected a list, got {raw!r}")
        return tuple(parse(item) for item in items)

    return parse_all


# --- the one table of keys ---


@dataclass(frozen=True)
class Key:
    """How one RunConfig field appears to users: flag, TOML key and docs row."""

    help: str
    metavar: str
    parse: Callable[[object], Any]
    repeat: bool = False
    default_doc: str | None = None  # shown instead of the default (e.g. a machine-specific path)
    relative_to_file: bool = False  # relative paths in a TOML file resolve against its folder
    const: object = None  # the value of the bare flag (e.g. `--midi-virtual` = yes); the value stays optional


def _key(help: str, metavar: str, parse: Callable[[object], Any], **kwargs: Any) -> dict[str, Key]:
    return {"key": Key(help, metavar, parse, **kwargs)}


@dataclass(frozen=True)
class RunConfig:
    """Everything `run` needs; build it with `resolve_run_config`, which validates each value."""

    model: str = field(default="default", metadata=_key(
        "a model name (yours in models_dir, else a shipped one) or a model folder path", "MODEL", _model))
    step_engine: str = field(default="auto", metadata=_key(
        "what runs the model's step: auto (LiteRT where installed, else numpy where the model has step.npz, "
        "else TensorFlow), or force litert, numpy or tensorflow; /status `backend` names the one in use",
        "ENGINE", _choice(BACKENDS)))
    models_dir: Path = field(default_factory=user_models_dir, metadata=_key(
        "folder of your own models: `train` and `/learn` write here; a name is looked up here first, then "
        "among the shipped models (default, touch, chorale)", "DIR", _path,
        default_doc="models/ in the per-user folder", relative_to_file=True))
    host: str = field(default=DEFAULT_HOST, metadata=_key(
        "interface to listen on for OSC; anything but loopback is an explicit choice (see allow)",
        "HOST", _host))
    port: int = field(default=DEFAULT_PORT, metadata=_key(
        "UDP port to listen on for OSC (0 = any free port)", "PORT", _port))
    send: tuple[Endpoint, ...] = field(default=((DEFAULT_HOST, DEFAULT_SEND_PORT),), metadata=_key(
        f"where output goes; repeat for several (up to {MAX_DESTINATIONS}); given values replace "
        "the default; clients can also add themselves with /hello",
        "HOST:PORT", _each(_endpoint), repeat=True, default_doc=f"{DEFAULT_HOST}:{DEFAULT_SEND_PORT}"))
    mode: Mode = field(default=Settings.mode, metadata=_key(
        f"interaction mode: {', '.join(MODE_NAMES)}", "MODE", _mode, default_doc=Settings.mode.value))
    temperature: float = field(default=Settings.temperature, metadata=_key(
        "mixture-weight temperature (>= 0; 0 = most likely component)", "T", _non_negative))
    sigma_temperature: float | None = field(default=Settings.sigma_temperature, metadata=_key(
        "scale temperature (>= 0; 0 = the component's mean)", "T", _non_negative,
        default_doc="the model's own: calibrated at training, in model.json; 1 if it has none"))
    timescale: float = field(default=Settings.timescale, metadata=_key(
        "multiplies predicted dt before scheduling (> 0)", "FACTOR", _positive))
    max_rate: float = field(default=DEFAULT_MAX_RATE, metadata=_key(
        "most model events per second per voice, in every mode and at any timescale (> 0)", "N", _positive))
    threshold: float = field(default=Settings.threshold, metadata=_key(
        "seconds of performer silence before respond mode takes over (>= 0)", "SECONDS", _non_negative))
    voices: VoicePolicy = field(default=VoicePolicy.ONE, metadata=_key(
        "one (every performer shares one voice) or per-sender (each OSC sender or MIDI channel, or a voice "
        "argument, is a voice with its own memory; outputs carry the voice number)", "POLICY", _voices,
        default_doc=VoicePolicy.ONE.value))
    max_voices: int = field(default=DEFAULT_MAX_VOICES, metadata=_key(
        f"most voices playing at once when voices is per-sender (1-{MAX_VOICE_LIMIT})", "N",
        _int_in(1, MAX_VOICE_LIMIT, "voice count")))
    max_voices_per_sender: int = field(default=DEFAULT_MAX_VOICES_PER_SENDER, metadata=_key(
        f"most voices one sender (an OSC host:port, a MIDI channel) may open, by playing or by naming voice "
        f"numbers, when voices is per-sender (1-{MAX_VOICE_LIMIT}); a voice answers only to the sender that "
        "opened it", "N", _int_in(1, MAX_VOICE_LIMIT, "voice count")))
    voice_timeout: float = field(default=DEFAULT_VOICE_TIMEOUT, metadata=_key(
        "seconds without a performer event after which a voice is forgotten (> 0)", "SECONDS", _positive))
    lookahead: float = field(default=Settings.lookahead, metadata=_key(
        "send each model event this many seconds early, as an OSC bundle timetagged with its time "
        f"(0-{MAX_LOOKAHEAD:g}; 0 = plain messages when due)", "SECONDS", _lookahead))
    log_dir: Path = field(default_factory=user_logs_dir, metadata=_key(
        "folder for performance logs, one CSV per run", "DIR", _path, default_doc="logs/ in the per-user folder",
        relative_to_file=True))
    seed: int | None = field(default=None, metadata=_key(
        "random seed for sampling, to repeat a performance exactly", "N", _seed,
        default_doc="none (unpredictable)"))
    allow: tuple[Network, ...] = field(default=(), metadata=_key(
        "accept OSC only from these networks (address or CIDR); repeat for several",
        "CIDR", _each(_network), repeat=True, default_doc="anyone who can reach host"))
    midi_in: str | None = field(default=None, metadata=_key(
        "MIDI input to play from: a port name or part of one (see `midi-ports`)", "NAME",
        _text("(part of) a MIDI port name"), default_doc="none"))
    midi_out: str | None = field(default=None, metadata=_key(
        "MIDI output the model plays: a port name or part of one (see `midi-ports`)", "NAME",
        _text("(part of) a MIDI port name"), default_doc="none"))
    midi_virtual: bool = field(default=False, metadata=_key(
        "create virtual ports 'Antiphon in' / 'Antiphon out' for whichever of midi_in / midi_out "
        "is not given (macOS, Linux; not Windows); the bare flag means yes", "yes/no", _switch, const=True,
        default_doc="no"))
    midi_channel: int = field(default=1, metadata=_key(
        "MIDI channel the model's notes are sent on when voices is one (1-16); with per-sender, voice n "
        "plays on channel n+1", "N", _int_in(1, 16, "MIDI channel")))
    midi_input_channel: int = field(default=0, metadata=_key(
        "MIDI channel listened to (1-16; 0 = any)", "N", _int_in(0, 16, "MIDI channel", " (0 = any)"),
        default_doc="0 (any)"))
    midi_input_map: str = field(default="notes", metadata=_key(
        "how MIDI input becomes a position: notes (pitch/127, velocity/127) or cc "
        "(midi_cc_x, midi_cc_y values/127)", "MAP", _choice(midimap.INPUT_MAPS)))
    midi_cc_x: int = field(default=midimap.DEFAULT_CC_X, metadata=_key(
        "control change number for x when midi_input_map is cc", "CC", _int_in(0, 127, "control change number")))
    midi_cc_y: int = field(default=midimap.DEFAULT_CC_Y, metadata=_key(
        "control change number for y when midi_input_map is cc", "CC", _int_in(0, 127, "control change number")))
    midi_cc: tuple[int, ...] = field(default=(), metadata=_key(
        f"a control change number per value (up to {midimap.MAX_CCS}, e.g. 1,2,7,10): each CC plays one of the "
        "model's values in and out, so a bank of knobs is a performance; the list's length must be the model's "
        "N (`/status dims`); replaces midi_input_map, and the output sends CCs instead of notes", "CC,CC,...",
        _cc_list, default_doc="none (notes, or midi_input_map)"))
    midi_note_duration: float | None = field(default=None, metadata=_key(
        "seconds each model note sounds, or auto", "SECONDS", _duration,
        default_doc="auto: the smaller of the predicted dt and 0.5 s"))
    monitor: bool = field(default=False, metadata=_key(
        "also start the web monitor (its own process) on monitor_port; the bare flag means yes", "yes/no",
        _switch, const=True, default_doc="no"))
    monitor_port: int = field(default=MONITOR_PORT, metadata=_key(
        "HTTP port of the web monitor (loopback only; 0 = any free port)", "PORT", _port))
    oscquery: int | None = field(default=None, metadata=_key(
        "serve the OSC namespace as OSCQuery (JSON over HTTP) on this TCP port, where OSC listens (host); "
        f"the bare flag means {DEFAULT_OSCQUERY_PORT}; 0 = any free port", "PORT", _port,
        const=DEFAULT_OSCQUERY_PORT, default_doc="off"))
    advertise: bool = field(default=False, metadata=_key(
        "announce the OSCQuery server and the OSC port on the local network over mDNS (_oscjson._tcp, _osc._udp; needs "
        "oscquery and the zeroconf package); the bare flag means yes", "yes/no", _switch, const=True, default_doc="no"))


def _keys() -> tuple[tuple[Field[Any], Key], ...]:
    return tuple((f, f.metadata["key"]) for f in fields(RunConfig))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_doc(f: Field[Any], key: Key) -> str:
    if key.default_doc is not None:
        return key.default_doc
    assert f.default is not MISSING
    return str(f.default)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per RunConfig key plus `--config FILE.toml`; defaults are None so 'given' is detectable."""
    parser.add_argument("--config", metavar="FILE.toml", default=None,
                        help="read settings from a TOML file (keys as below, '-' or '_'); flags override it")
    for f, key in _keys():
        parser.add_argument(
            _flag(f.name), dest=f.name, default=None, metavar=key.metavar,
            action="append" if key.repeat else "store",
            **({"nargs": "?", "const": key.const} if key.const is not None else {}),
            help=f"{key.help} (default: {_default_doc(f, key)})".replace("%", "%%"),
        )


def resolve_run_config(args: argparse.Namespace) -> RunConfig:
    """Merge defaults < the `--config` TOML file < flags into a validated RunConfig, or raise ConfigError."""
    keys = {f.name: key for f, key in _keys()}
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None)
    if config_file is not None:
        path = Path(config_file)
        seen: dict[str, str] = {}
        for raw_key, raw in _read_toml(path).items():
            name = raw_key.replace("-", "_")
            if name not in keys:
                raise ConfigError(
                    f"{path}: unknown key {raw_key!r}; valid keys: {', '.join(keys)}")
            if name in seen:
                raise ConfigError(f"{path}: {raw_key!r} repeats {seen[name]!r}")
            seen[name] = raw_key
            value = _parse(keys[name], raw, f"{path}: {raw_key}")
            if keys[name].relative_to_file and not value.is_absolute():
                value = path.parent / value
            values[name] = value
    for name, key in keys.items():
        raw = getattr(args, name, None)
        if raw is not None:
            values[name] = _parse(key, raw, _flag(name))
    if len(values.get("send", ())) > MAX_DESTINATIONS:
        raise ConfigError(f"send: at most {MAX_DESTINATIONS} destinations, got {len(values['send'])}")
    if values.get("midi_cc_x", midimap.DEFAULT_CC_X) == values.get("midi_cc_y", midimap.DEFAULT_CC_Y):
        raise ConfigError("midi_cc_x and midi_cc_y must be different controllers")
    if values.get("advertise") and values.get("oscquery") is None:
        raise ConfigError("advertise announces the OSCQuery server: give --oscquery [PORT] (or oscquery = PORT) too")
    return RunConfig(**values)


def _parse(key: Key, raw: object, origin: str) -> Any:
    try:
        return key.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


def _read_toml(path: Path) -> Mapping[str, Any]:
    """The file's table, or a ConfigError naming the file and what is wrong with it (never a traceback)."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; give a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "a config file is TOML, saved as UTF-8"
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None


def config_reference_markdown() -> str:
    """A Markdown table of every key (TOML key, flag, default, meaning) for docs/commands.md."""
    rows = [
        "| key | flag | default | meaning |",
        "|---|---|---|---|",
    ]
    for f, key in _keys():
        flag = f"`{_flag(f.name)} {key.metavar}`" + (" (repeatable)" if key.repeat else "")
        rows.append(f"| `{f.name}` | {flag} | `{_default_doc(f, key)}` | {key.help.replace('|', chr(92) + '|')} |")
    rows.append("")
    rows.append("Put any key in a TOML file and pass `--config FILE.toml` (write keys with `_` or `-`; "
                "lists for repeatable keys). Flags override the file, which overrides the defaults; "
                "relative paths in the file are relative to the file.")
    return "\n".join(rows)


def config_reference_text() -> str:
    """The same reference as aligned plain text (also appended to this module's docstring)."""
    pairs = [(f"{f.name} ({_flag(f.name)} {key.metavar})", f"{key.help}; default {_default_doc(f, key)}")
             for f, key in _keys()]
    width = max(len(left) for left, _ in pairs)
    return "\n".join(f"  {left:<{width}}  {right}" for left, right in pairs)


__doc__ = f"{__doc__}\nKeys:\n\n{config_reference_text()}\n"
