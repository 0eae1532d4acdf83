"""Grad-CAM: where in the image a model found the evidence for one class.

Selvaraju et al. (ICCV 2017): the gradient of the class score with respect to the
activations ``A`` of a convolutional layer, averaged over the layer's grid, weighs each
channel; the map is ``ReLU(sum_k alpha_k A_k)`` on that grid, here divided by its peak.

The class score is the class's **log-odds against the other classes**, from the logits,
when the model ends in a softmax (both of the paper's heads do):
``z_c - logsumexp(z_j, j != c)``, which for two classes is ``z_c - z_other``. A softmax's
lone logit ``z_c`` is not class-discriminative (all the logits can rise together while
``p_c`` stays put), and taking it left a third of the demo's "autoimmune" images with a
blank map. The log-probability would be, but its gradient shrinks with ``1 - p_c`` and
drowns in float32 rounding on confident images; the log-odds' does not. With a sigmoid
the logit is already the log-odds and is the score. A model that ends otherwise is
explained through its output (a probability).

The maps come from the model itself, with its own preprocessing: the model is cut at
the layer, also when the layer sits in a nested base model (``image -> preprocess ->
base -> head``), into a *front* (image to activations) and a *rest* (activations to
the final layer's input). Gradients have no backend-neutral API in Keras 3, so one small
function per backend (TensorFlow, JAX, torch) takes them; the rest is ``keras.ops``.
"""

from __future__ import annotations

import io
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from thyrocad.models.errors import ModelsError

METHOD = "grad-cam"
DEFAULT_BATCH = 32


class EvidenceError(ModelsError):
    """A class-activation map cannot be computed for this model, layer or input."""


def grad_cam(
    model: Any,
    images: np.ndarray,
    layer_name: str,
    class_index: int,
    batch_size: int = DEFAULT_BATCH,
) -> np.ndarray:
    """Return the Grad-CAM maps of ``class_index`` on the grid of ``layer_name``.

    In: a functional Keras model with one image input and one output of class scores;
    ``images`` as the model takes them, ``(N, H, W, C)`` or ``(N, H, W)`` for one
    channel (raw 0-255 grey for thyrocad's models, whose preprocessing is inside the
    model); the name of a convolutional layer, found in nested models too; the index
    of the class to explain. Out: float32 ``(N, h, w)`` on the layer's ``h x w`` grid,
    in [0, 1] with 1 at each map's peak, all zeros where no location raises the score.

    The score differentiated is the class's log-odds against the other classes from
    the pre-softmax logits (the pre-sigmoid logit for a sigmoid) when the model ends in
    a softmax/sigmoid Dense or Activation layer, else the model's output for the class.
    Runs ``batch_size`` images at a time. Raises EvidenceError for a missing layer, a
    layer that is not a feature map, a class index out of range or images of the wrong
    shape.
    """
    explainer = _explainer(model, layer_name)
    if not 0 <= int(class_index) < explainer.n_classes:
        raise EvidenceError(
            f"class_index {class_index} is out of range for {explainer.n_classes} classes"
        )
    array = _as_batch(model, images)
    if len(array) == 0:
        return np.zeros((0, *explainer.grid), dtype=np.float32)
    step = max(1, int(batch_size))
    parts = [
        explainer.maps(array[start : start + step], int(class_index))
        for start in range(0, len(array), step)
    ]
    return np.concatenate(parts).astype(np.float32, copy=False)


def evidence_png(cam: np.ndarray) -> bytes:
    """Encode one map ``(h, w)`` as an 8-bit grey PNG at its own resolution.

    Values are scaled so the peak is 255 (an all-zero map stays black). Raises
    EvidenceError for a map that is not 2-D, is negative or holds NaN or infinity.
    """
    from PIL import Image

    array = np.asarray(cam, dtype=np.float64)
    if array.ndim != 2 or array.size == 0:
        raise EvidenceError(f"an evidence map is a non-empty 2-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise EvidenceError("the evidence map holds NaN or infinite values")
    if array.min() < 0:
        raise EvidenceError(f"the evidence map has negative values (min {array.min():g})")
    peak = array.max()
    scaled = np.zeros(array.shape, dtype=np.uint8)
    if peak > 0:
        scaled = np.rint(array / peak * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(scaled, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def find_layer(model: Any, layer_name: str) -> Any:
    """Return the layer called ``layer_name`` in ``model`` or in a model nested in it."""
    found = _find(model, layer_name)
    if found is None:
        raise EvidenceError(
            f"model {getattr(model, 'name', model)!r} has no layer {layer_name!r} "
            "(nested models searched too): the evidence layer must name a convolutional "
            "layer of this model"
        )
    return found


# --------------------------------------------------------------------------- the computation


def _combine(activations: Any, gradients: Any) -> Any:
    """Grad-CAM from activations and gradients ``(N, h, w, C)``: ``(N, h, w)`` in [0, 1]."""
    channels_first = keras.config.image_data_format() == "channels_first"
    spatial, channel = ((2, 3), 1) if channels_first else ((1, 2), -1)
    activations = ops.cast(activations, "float32")
    gradients = ops.cast(gradients, "float32")
    weights = ops.mean(gradients, axis=spatial, keepdims=True)
    cam = ops.relu(ops.sum(weights * activations, axis=channel))
    peak = ops.max(cam, axis=(1, 2), keepdims=True)
    return ops.where(peak > 0, cam / ops.maximum(peak, 1e-30), ops.zeros_like(cam))


@dataclass
class _Explainer:
    """One model cut at one layer, with its gradient function compiled for the backend."""

    front: Any  # image -> activations
    rest: Any | None  # activations -> the score's input (None: the activations themselves)
    final: Any | None  # the softmax/sigmoid layer whose pre-activation is the score
    n_classes: int
    grid: tuple[int, int]
    _compiled: Callable[[np.ndarray, int], np.ndarray] | None = None

    def score(self, head_input: Any, class_index: Any, kernel: Any, bias: Any) -> Any:
        """The summed class score of a batch (samples are independent: one backward pass)."""
        x = ops.cast(head_input, "float32")
        if isinstance(self.final, keras.layers.Dense):
            x = ops.matmul(x, ops.cast(kernel, "float32"))
            if bias is not None:
                x = x + ops.cast(bias, "float32")
        one_hot = ops.one_hot(class_index, ops.shape(x)[-1], dtype="float32")
        score = ops.sum(x * one_hot, axis=-1)
        if self.n_classes > 1 and _activation_name(self.final) == "softmax":
            # Log-odds against the rest: the other classes' logits, the class masked out.
            others = ops.logsumexp(x - 1e9 * one_hot, axis=-1)
            score = score - others
        return ops.sum(score)

    def final_weights(self) -> tuple[Any, Any]:
        if not isinstance(self.final, keras.layers.Dense):
            return None, None
        return self.final.kernel, (self.final.bias if self.final.use_bias else None)

    def maps(self, images: np.ndarray, class_index: int) -> np.ndarray:
        if self._compiled is None:
            self._compiled = _gradient_function(self)
        return self._compiled(images, class_index)


def _gradient_function(ex: _Explainer) -> Callable[[np.ndarray, int], np.ndarray]:
    """``f(images, class_index) -> maps``, the one backend-specific part of Grad-CAM."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow(ex)
    if backend == "jax":
        return _jax(ex)
    if backend == "torch":
        return _torch(ex)
    raise EvidenceError(
        f"Grad-CAM needs gradients, which thyrocad takes only on TensorFlow, "
        f"JAX or torch, not {backend!r}"
    )


def _tensorflow(ex: _Explainer) -> Callable[[np.ndarray, int], np.ndarray]:
    import tensorflow as tf

    shape = [None, *ex.front.input_shape[1:]]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32), tf.TensorSpec([], tf.int32)])
    def call(images: Any, class_index: Any) -> Any:
        activations = ex.front(images, training=False)
        kernel, bias = ex.final_weights()
        with tf.GradientTape() as tape:
            tape.watch(activations)
            head = activations if ex.rest is None else ex.rest(activations, training=False)
            score = ex.score(head, class_index, kernel, bias)
        return _combine(activations, tape.gradient(score, activations))

    return lambda images, c: call(tf.constant(images), tf.constant(c, tf.int32)).numpy()


def _jax(ex: _Explainer) -> Callable[[np.ndarray, int], np.ndarray]:
    import jax

    def values(model: Any) -> tuple[list[Any], list[Any]]:
        if model is None:
            return [], []
        return (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )

    def call(front_vars: Any, rest_vars: Any, final: Any, images: Any, class_index: Any) -> Any:
        activations, _ = ex.front.stateless_call(*front_vars, images, training=False)

        def score(a: Any) -> Any:
            head = a
            if ex.rest is not None:
                head, _ = ex.rest.stateless_call(*rest_vars, a, training=False)
            return ex.score(head, class_index, *final)

        return _combine(activations, jax.grad(score)(activations))

    compiled = jax.jit(call)

    def run(images: np.ndarray, class_index: int) -> np.ndarray:
        kernel, bias = ex.final_weights()
        final = tuple(None if w is None else ops.convert_to_tensor(w) for w in (kernel, bias))
        # Weights go in as arguments, so a model trained further is never explained stale.
        out = compiled(values(ex.front), values(ex.rest), final, images, class_index)
        return np.asarray(out)

    return run


def _torch(ex: _Explainer) -> Callable[[np.ndarray, int], np.ndarray]:
    import torch

    def run(images: np.ndarray, class_index: int) -> np.ndarray:
        with torch.enable_grad():
            activations = ex.front(ops.convert_to_tensor(images), training=False)
            activations = activations.detach().requires_grad_(True)
            head = activations if ex.rest is None else ex.rest(activations, training=False)
            score = ex.score(head, class_index, *ex.final_weights())
            (gradients,) = torch.autograd.grad(score, activations)
        return np.asarray(ops.convert_to_numpy(_combine(activations.detach(), gradients)))

    return run


# --------------------------------------------------------------------------- cutting the model

_cache: weakref.WeakKeyDictionary[Any, dict[tuple[str, tuple[str, ...]], _Explainer]] = (
    weakref.WeakKeyDictionary()
)
_cache_lock = threading.Lock()

# One step of a chain-shaped model, to be called on a new tensor.
Stage = Callable[[Any], Any]
# Finds a tensor of a model's own graph, or None when it is not there.
Locate = Callable[[Any], Any]


def _explainer(model: Any, layer_name: str) -> _Explainer:
    """The cut of ``model`` at ``layer_name``, made once per model and layer."""
    # A model switched to another dtype policy since (mixed precision on a GPU worker)
    # gets a new cut: the compiled gradient function was traced under the old one.
    key = (layer_name, _policies(model))
    with _cache_lock:
        per_model = _cache.setdefault(model, {})
        if key not in per_model:
            per_model[key] = _cut(model, layer_name)
        return per_model[key]


def _policies(model: Any) -> tuple[str, ...]:
    return tuple(
        str(getattr(layer, "dtype_policy", ""))
        for layer in model._flatten_layers(include_self=True)
    )


def _cut(model: Any, layer_name: str) -> _Explainer:
    _functional(model)
    find_layer(model, layer_name)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise EvidenceError(f"model {model.name!r} must have one input and one output")

    def layer_output(m: Any) -> Any:
        names = [layer.name for layer in m.layers]
        return _output_in(m, m.layers[names.index(layer_name)]) if layer_name in names else None

    front_stages, rest_stages = _stages_to(model, layer_output, last_only=False)
    front = _compose(front_stages, model.inputs[0], "gradcam_front")
    out_shape = tuple(front.outputs[0].shape)
    if len(out_shape) != 4:
        raise EvidenceError(
            f"layer {layer_name!r} outputs {out_shape}, not a convolutional feature map "
            "(N, h, w, channels): choose a convolutional layer"
        )
    if not rest_stages:
        raise EvidenceError(f"layer {layer_name!r} is the model's output, not a layer inside it")
    rest_all = _compose(rest_stages, front.outputs[0], "gradcam_rest")
    rest, final = rest_all, _final_layer(rest_all)
    if final is not None:
        try:
            to_logits, _ = _stages_to(rest_all, _logit_input, last_only=True)
        except EvidenceError:  # the final layer's input cannot be cut out: the output then
            final = None
        else:
            rest = _compose(to_logits, front.outputs[0], "gradcam_logits") if to_logits else None
    spatial = (2, 3) if keras.config.image_data_format() == "channels_first" else (1, 2)
    grid = (int(out_shape[spatial[0]]), int(out_shape[spatial[1]]))
    n_classes = int(model.outputs[0].shape[-1])
    return _Explainer(front, rest, final, n_classes, grid)


def _functional(model: Any) -> None:
    if not isinstance(model, keras.Model) or not hasattr(model, "_nodes_by_depth"):
        raise EvidenceError(
            f"{getattr(model, 'name', model)!r} is not a functional Keras model; "
            "Grad-CAM cuts a model's graph at a layer"
        )


def _find(model: Any, layer_name: str) -> Any | None:
    for layer in getattr(model, "layers", ()):
        if layer.name == layer_name:
            return layer
        if isinstance(layer, keras.Model):
            inner = _find(layer, layer_name)
            if inner is not None:
                return inner
    return None


def _single(values: Sequence[Any], what: str, model: Any) -> Any:
    if len(values) != 1:
        raise EvidenceError(f"model {model.name!r}: expected one {what}, found {len(values)}")
    return values[0]


def _own_nodes(model: Any) -> set[int]:
    return {id(node) for nodes in model._nodes_by_depth.values() for node in nodes}


def _output_in(model: Any, layer: Any) -> Any:
    """``layer``'s output tensor in ``model``'s own graph (it may be called elsewhere too)."""
    own = _own_nodes(model)
    node = _single(
        [n for n in layer._inbound_nodes if id(n) in own], f"call of {layer.name}", model
    )
    return _single(list(node.output_tensors), f"output of {layer.name}", model)


def _chain(model: Any) -> list[tuple[Any, Any]]:
    """The (operation, node) steps from ``model``'s input to its output, in order.

    Only for a model whose every step reads only the step before (thyrocad's outer model
    is ``image -> preprocess -> base -> head``). The nodes are this model's own calls,
    so a layer also called in another graph (the training extractor) is replayed as here.
    """
    source = model.inputs[0]
    tensor = model.outputs[0]
    steps: list[tuple[Any, Any]] = []
    while tensor is not source:
        history = tensor._keras_history
        operation = history.operation
        if operation is None or isinstance(operation, keras.layers.InputLayer):
            raise EvidenceError(f"model {model.name!r}: its output does not lead to its input")
        node = operation._inbound_nodes[history.node_index]
        inputs = list(node.input_tensors)
        if len(inputs) != 1 or len(node.output_tensors) != 1:
            raise EvidenceError(
                f"model {model.name!r} branches at {operation.name!r}: a layer inside a "
                "nested model can be explained only when the models around it are chains"
            )
        steps.append((operation, node))
        tensor = inputs[0]
    return steps[::-1]


def _replay(operation: Any, node: Any) -> Stage:
    """Call ``operation`` on a new tensor with ``node``'s other arguments (training=False)."""
    (original,) = node.input_tensors

    def stage(x: Any) -> Any:
        args, kwargs = node.arguments.fill_in({id(original): x})
        return operation(*args, **kwargs)

    return stage


def _contains(model: Any, locate: Locate) -> bool:
    if locate(model) is not None:
        return True
    return any(
        isinstance(layer, keras.Model)
        and hasattr(layer, "_nodes_by_depth")
        and _contains(layer, locate)
        for layer in model.layers
    )


def _stages_to(model: Any, locate: Locate, last_only: bool) -> tuple[list[Stage], list[Stage]]:
    """Stages from ``model``'s input to the tensor ``locate`` finds, and from it on.

    The tensor is in ``model``'s own graph or in a model nested in it (recursively,
    through chain-shaped outer models); ``last_only`` looks only in the last step.
    """
    target = locate(model)
    if target is not None:
        source, output = model.inputs[0], model.outputs[0]
        front = [] if target is source else [keras.Model(model.inputs, target)]
        # From a tensor that is no Input, Keras clones the graph; it refuses (with its own
        # error) a rest that also reads tensors from before the target.
        rest = [] if target is output else [keras.Model(target, output)]
        return front, rest
    steps = _chain(model)
    for index, (operation, _) in enumerate(steps):
        if last_only and index != len(steps) - 1:
            continue
        if isinstance(operation, keras.Model) and _contains(operation, locate):
            inner_front, inner_rest = _stages_to(operation, locate, last_only)
            before = [_replay(op, n) for op, n in steps[:index]]
            after = [_replay(op, n) for op, n in steps[index + 1 :]]
            # The parts run in inference mode: front and rest are called training=False.
            return before + inner_front, inner_rest + after
    raise EvidenceError(f"model {model.name!r}: the layer to cut at was not found in it")


def _compose(stages: list[Stage], like: Any, name: str) -> Any:
    """A model from a new Input shaped like the tensor ``like`` through ``stages``."""
    inputs = keras.Input(shape=tuple(like.shape[1:]), dtype=like.dtype)
    x = inputs
    for stage in stages:
        x = stage(x)
    return keras.Model(inputs, x, name=name)


def _final_layer(model: Any) -> Any | None:
    """The softmax/sigmoid Dense or Activation layer ending ``model`` (through nested
    models), or None when the model ends otherwise."""
    operation = model.outputs[0]._keras_history.operation
    if isinstance(operation, keras.Model) and hasattr(operation, "_nodes_by_depth"):
        return _final_layer(operation)
    if not isinstance(operation, keras.layers.Dense | keras.layers.Activation):
        return None
    if _activation_name(operation) not in ("softmax", "sigmoid"):
        return None
    return operation


def _activation_name(layer: Any | None) -> str:
    return str(getattr(getattr(layer, "activation", None), "__name__", ""))


def _logit_input(model: Any) -> Any | None:
    """The input tensor of the softmax/sigmoid layer ending ``model``'s own graph."""
    history = model.outputs[0]._keras_history
    operation: Any = history.operation
    final = _final_layer(model)
    if final is None or isinstance(operation, keras.Model) or operation is not final:
        return None
    node = operation._inbound_nodes[history.node_index]
    return _single(list(node.input_tensors), f"input of {operation.name}", model)


def _as_batch(model: Any, images: np.ndarray) -> np.ndarray:
    array = np.asarray(images)
    expected = tuple(model.inputs[0].shape[1:])
    if array.ndim == len(expected) and expected[-1] == 1:
        array = array[..., None]
    if array.ndim != len(expected) + 1 or any(
        e is not None and e != a for e, a in zip(expected, array.shape[1:], strict=True)
    ):
        raise EvidenceError(
            f"model {model.name!r} takes images of shape (N, {', '.join(map(str, expected))}), "
            f"got {np.asarray(images).shape}"
        )
    return np.ascontiguousarray(array, dtype=np.float32)
