"""The web monitor: its own process that bridges a running Antiphon server (OSC over UDP)
to a browser page (HTTP + WebSocket on 127.0.0.1:5712 by default).

Never imported by the server; imports neither Keras, TensorFlow nor `server.learn`.
"""
