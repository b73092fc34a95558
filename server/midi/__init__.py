"""Live MIDI: ports (found by name, reopened when they return), note/CC mapping, and the link to the engine."""
