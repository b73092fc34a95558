"""Learning: datasets (logs, MIDI files, synthetic gestures), training, evaluation and the training report.

Offline work: the live packages never import this one.
"""
