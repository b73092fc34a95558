"""The RNN + MDN in Keras: the MDN head and its tfp loss, the sequence model, the one-step function.

Training and the TensorFlow fallback use this module; the live server with LiteRT
never imports it (see `server.model.predictor`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from server.model.mdn import SCALE_EPS, param_count
from server.model.quiet import native_stderr_silenced
from server.model.spec import ModelError, ModelSpec

with native_stderr_silenced():
    import keras
    import tensorflow as tf
    import tensorflow_probability  # noqa: F401  (imported here, quietly, for the loss)

    tf.config.list_physical_devices()  # the device probe is what prints the CUDA "error"


def make_mdn_layer_class():
    """Build (once per process) the registered Keras MDN layer class.

    Defined on first use, because Keras' registry is per process and tests rebuild it.
    """
    registered = keras.saving.get_registered_object("antiphon>MDN")
    if registered is not None:
        return registered

    @keras.saving.register_keras_serializable(package="antiphon", name="MDN")
    class MDN(keras.layers.Layer):
        """Dense head emitting ``[means | ELU+1+eps scales | logits]`` for a K-component diagonal mixture."""

        def __init__(self, dims: int, mixtures: int, **kwargs):
            super().__init__(**kwargs)
            self.dims = int(dims)
            self.mixtures = int(mixtures)
            self.mu = keras.layers.Dense(self.mixtures * self.dims, name="mdn_mus")
            self.sigma = keras.layers.Dense(self.mixtures * self.dims, name="mdn_sigmas")
            self.pi = keras.layers.Dense(self.mixtures, name="mdn_pi")

        def build(self, input_shape):
            self.mu.build(input_shape)
            self.sigma.build(input_shape)
            self.pi.build(input_shape)
            super().build(input_shape)

        def call(self, inputs):
            ops = keras.ops
            scales = ops.elu(self.sigma(inputs)) + 1.0 + SCALE_EPS
            return ops.concatenate([self.mu(inputs), scales, self.pi(inputs)], axis=-1)

        def compute_output_shape(self, input_shape):
            return (*input_shape[:-1], param_count(self.mixtures, self.dims))

        def get_config(self):
            return {**super().get_config(), "dims": self.dims, "mixtures": self.mixtures}

    return MDN


def mixture_distribution(params, mixtures: int, dims: int, active: tuple[int, ...] | None = None):
    """The tfp distribution for a tensor of parameters ``[..., P]``, over the ``active`` dimensions (default all)."""
    import tensorflow_probability as tfp

    tfd = tfp.distributions
    lead = tf.shape(params)[:-1]
    kd = mixtures * dims
    means = tf.reshape(params[..., :kd], tf.concat([lead, [mixtures, dims]], 0))
    scales = tf.reshape(params[..., kd : 2 * kd], tf.concat([lead, [mixtures, dims]], 0))
    if active is not None and tuple(active) != tuple(range(dims)):
        means = tf.gather(means, list(active), axis=-1)
        scales = tf.gather(scales, list(active), axis=-1)
    logits = params[..., 2 * kd :]
    return tfd.MixtureSameFamily(
        mixture_distribution=tfd.Categorical(logits=logits),
        components_distribution=tfd.MultivariateNormalDiag(loc=means, scale_diag=scales),
    )


def mdn_loss(mixtures: int, dims: int, active: tuple[int, ...] | None = None):
    """Keras loss: mean negative log-likelihood of the targets under the predicted mixture.

    ``y_true`` is ``[..., dims]``, or ``[..., dims + 1]`` with a last column of weights
    (0 for the padding of a short performance), so the mean is over real events only.
    Constant dimensions are left out through ``active``.
    """
    active = tuple(range(dims)) if active is None else tuple(active)

    def loss(y_true, y_pred):
        y_true = tf.cast(y_true, y_pred.dtype)
        target = tf.gather(y_true[..., :dims], list(active), axis=-1)
        log_prob = mixture_distribution(y_pred, mixtures, dims, active).log_prob(target)
        if y_true.shape[-1] == dims + 1:
            weight = y_true[..., dims]
            return -tf.reduce_sum(log_prob * weight) / tf.maximum(tf.reduce_sum(weight), 1.0)
        return -tf.reduce_mean(log_prob)

    loss.__name__ = "mdn_nll"
    return loss


def build_model(spec: ModelSpec, dropout: float = 0.0) -> keras.Model:
    """Sequence model ``[B, T, dims] -> [B, T, P]`` from a zero state (used for training and evaluation).

    ``dropout`` regularises training between the layers; it has no weights, so the
    exported step (LSTM cells and head only) is the same network without it.
    """
    MDN = make_mdn_layer_class()
    inputs = keras.Input(shape=(None, spec.dims), name="events")
    x = inputs
    for i in range(spec.layers):
        x = keras.layers.LSTM(spec.units, return_sequences=True, name=f"lstm_{i}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    outputs = MDN(spec.dims, spec.mixtures, name="mdn")(x)
    return keras.Model(inputs, outputs, name="antiphon")


def load_keras_model(path: Path) -> keras.Model:
    """Load `model.keras` with safe_mode (no arbitrary code, no pickles)."""
    make_mdn_layer_class()
    try:
        return keras.saving.load_model(Path(path), compile=False, safe_mode=True)
    except Exception as e:  # keras raises many types for a bad file
        raise ModelError(f"{path} cannot be loaded ({type(e).__name__}: {e}); re-export the model") from e


def keras_model_from_bytes(data: bytes, label: str = "model.keras") -> keras.Model:
    """Load checked `model.keras` bytes: Keras reads only paths, so through a private temporary file."""
    with tempfile.TemporaryDirectory(prefix="antiphon-") as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(data)
        try:
            return load_keras_model(path)
        except ModelError as e:
            raise ModelError(str(e).replace(str(path), label)) from None


def lstm_layers(model: keras.Model, spec: ModelSpec) -> list:
    return [model.get_layer(f"lstm_{i}") for i in range(spec.layers)]


def make_step_function(model: keras.Model, spec: ModelSpec) -> tf.types.experimental.GenericFunction:
    """A compiled one-step function ``(event [1, dims], state [1, S]) -> (params [1, P], state [1, S])``.

    The LSTM state is an explicit flat tensor (per layer h then c), so the caller owns it:
    that is what lets LiteRT run the model one event at a time.
    """
    cells = [layer.cell for layer in lstm_layers(model, spec)]
    head = model.get_layer("mdn")
    units = spec.units

    @tf.function(
        input_signature=[
            tf.TensorSpec([1, spec.dims], tf.float32, name="event"),
            tf.TensorSpec([1, spec.state_size], tf.float32, name="state"),
        ]
    )
    def step(event, state):
        x = event
        new_state = []
        for i, cell in enumerate(cells):
            h = state[:, (2 * i) * units : (2 * i + 1) * units]
            c = state[:, (2 * i + 1) * units : (2 * i + 2) * units]
            x, (h, c) = cell(x, [h, c], training=False)
            new_state += [h, c]
        return {"params": head(x), "state": tf.concat(new_state, axis=-1)}

    return step


class TensorFlowStep:
    """Fallback: the compiled `tf.function` step on `model.keras` (imports TensorFlow)."""

    def __init__(self, model: keras.Model, spec: ModelSpec) -> None:
        self._fn = make_step_function(model, spec)

    def __call__(self, event: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self._fn(event, state)
        return out["params"].numpy()[0], out["state"].numpy()


class KerasPredictStep:
    """The naive path older systems used: `model.predict` on the sequence model per event (bench only)."""

    def __init__(self, src: keras.Model, spec: ModelSpec) -> None:
        # A stateful copy of the sequence model so predict() can run one step at a time.
        inputs = keras.Input(batch_shape=(1, 1, spec.dims))
        x = inputs
        for i in range(spec.layers):
            x = keras.layers.LSTM(spec.units, return_sequences=True, stateful=True, name=f"lstm_{i}")(x)
        x = src.get_layer("mdn").__class__(spec.dims, spec.mixtures, name="mdn")(x)
        self._model = keras.Model(inputs, x)
        self._model.set_weights(src.get_weights())

    def __call__(self, event: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        params = self._model.predict(event[None], verbose=0)[0, 0]
        return params, state
