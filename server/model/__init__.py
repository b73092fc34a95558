"""The model: MDN maths, normalisation, spec and files, the Keras network and its export, step backends, the Predictor.

Only `network` and `export` import TensorFlow; everything the stage needs does not.
"""
