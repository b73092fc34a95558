"""The live loop: the engine and its modes, the controls transports may use, and the performance recorder.

No TensorFlow, no `learn/`: the stage stays light and starts fast.
"""
