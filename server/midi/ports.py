"""Finding and opening MIDI ports, behind a small factory interface.

Everything that talks to the operating system's MIDI layer goes through a
`PortBackend`, so the live transport can be driven by in-memory ports in tests and
the rest of the server never sees a backend exception: failures become `MidiError`
with a message a musician can act on.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Protocol

VIRTUAL_IN = "Antiphon in"
VIRTUAL_OUT = "Antiphon out"
CLIENT_NAME = "Antiphon"

MessageCallback = Callable[[Any], None]


class MidiError(RuntimeError):
    """A MIDI port cannot be found or opened; the message says why and what to try."""


class InputPort(Protocol):
    name: str
    closed: bool

    def close(self) -> None: ...


class OutputPort(Protocol):
    name: str
    closed: bool

    def send(self, msg: Any) -> None: ...

    def close(self) -> None: ...


class PortBackend(Protocol):
    """Opens ports; every method raises MidiError (never a backend exception)."""

    def input_names(self) -> list[str]: ...

    def output_names(self) -> list[str]: ...

    def open_input(self, name: str, callback: MessageCallback, virtual: bool = False) -> InputPort:
        """Open ``name`` (exact) and call ``callback(msg)`` from the backend's thread for each message."""

    def open_output(self, name: str, virtual: bool = False) -> OutputPort: ...


def match_port(pattern: str, names: list[str], kind: str) -> str:
    """The one port name ``pattern`` designates: an exact name, else a unique case-insensitive substring."""
    if pattern in names:
        return pattern
    found = [n for n in names if pattern.lower() in n.lower()]
    if len(found) == 1:
        return found[0]
    available = ", ".join(repr(n) for n in names) or "none"
    if not found:
        raise MidiError(f"no MIDI {kind} port matches {pattern!r}; available {kind} ports: {available}")
    raise MidiError(f"{pattern!r} matches several MIDI {kind} ports ({', '.join(map(repr, found))}); give more of the name")


def virtual_supported() -> bool:
    """Windows' MIDI API has no virtual ports (loopMIDI provides them there)."""
    return sys.platform != "win32"


def _unavailable(e: BaseException) -> MidiError:
    hint = {
        "linux": "on Linux, MIDI needs the ALSA sequencer: load it with 'sudo modprobe snd-seq' "
        "(in a container, pass /dev/snd through)",
        "darwin": "on macOS, check Audio MIDI Setup",
        "win32": "on Windows, check the device driver or loopMIDI",
    }.get(sys.platform, "check the system's MIDI setup")
    return MidiError(f"MIDI is not available on this machine ({str(e).strip() or type(e).__name__}); {hint}")


class MidoBackend:
    """Real ports through mido's rtmidi backend (an instance owned here, not mido's module default)."""

    def __init__(self, backend_name: str = "mido.backends.rtmidi") -> None:
        import mido

        try:
            self._backend = mido.Backend(backend_name, load=True)
            import rtmidi
        except ImportError as e:
            raise MidiError(f"MIDI backend {backend_name} cannot be loaded ({e}); install python-rtmidi") from e
        self._rtmidi = rtmidi

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        rt = self._rtmidi
        try:
            return fn(*args, **kwargs)
        except (rt.UnsupportedOperationError, NotImplementedError) as e:
            raise MidiError(f"not supported by this MIDI backend ({e}); on Windows, use loopMIDI ports") from e
        except (rt.SystemError, rt.NoDevicesError, rt.MemoryAllocationError) as e:
            raise _unavailable(e) from e
        except (rt.RtMidiError, OSError, ValueError) as e:
            raise MidiError(str(e) or type(e).__name__) from e

    def input_names(self) -> list[str]:
        return list(self._call(self._backend.get_input_names))

    def output_names(self) -> list[str]:
        return list(self._call(self._backend.get_output_names))

    def open_input(self, name: str, callback: MessageCallback, virtual: bool = False) -> InputPort:
        extra = {"client_name": CLIENT_NAME} if virtual else {}
        return self._call(self._backend.open_input, name, virtual=virtual, callback=callback, **extra)

    def open_output(self, name: str, virtual: bool = False) -> OutputPort:
        extra = {"client_name": CLIENT_NAME} if virtual else {}
        return self._call(self._backend.open_output, name, virtual=virtual, **extra)


def open_backend() -> PortBackend:
    """The real MIDI backend, or MidiError saying why there is none."""
    return MidoBackend()


def list_ports(backend: PortBackend) -> tuple[list[str], list[str]]:
    """(input names, output names)."""
    return backend.input_names(), backend.output_names()
