"""The web monitor: its own process that bridges a running Antiphon server (OSC over UDP)
to a browser page (HTTP + WebSocket on DEFAULT_HOST:DEFAULT_PORT by default).

The server imports nothing from here but these two defaults (for `run --monitor`);
the monitor imports neither Keras, TensorFlow nor `server.learn`.
"""

DEFAULT_HOST = "127.0.0.1"  # loopback: this machine only
DEFAULT_PORT = 5712
