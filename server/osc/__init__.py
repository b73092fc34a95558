"""OSC over UDP: the namespace (one handler per address), the protocol that applies it, output, wire checks.

Transports turn datagrams into `Controls` calls and model events into datagrams; they
never touch the model.
"""
