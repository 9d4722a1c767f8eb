"""Export a fitted TF-IDF + linear model to one ONNX graph (opened by :mod:`classifiers.graph`).

skl2onnx converts the text front end (lower-casing, the ``TOKEN_PATTERN`` tokenizer,
the n-gram TfIdfVectorizer op). The tail is written here rather than converted, because
every dense op over the vocabulary costs microseconds per request and skl2onnx's tail has
four of them (Mul by idf, the ai.onnx.ml Normalizer, LinearClassifier, a second
Normalizer). With ``x`` the n-gram counts, ``z = x * idf`` (folded into the TfIdfVectorizer
op's TFIDF mode), the graph computes

    features      f = z / max(||z||_2, eps)          (scikit-learn's norm="l2"; 0 stays 0)
    probabilities p = softmax(f W^T + b)              (multinomial logistic regression)
    centroid_cosine c = f C^T                         (rows of C are unit-norm centroids)

with one MatMul over ``[W^T | C^T]`` and the division applied to its ``2K`` outputs, so
the vocabulary is read twice per prompt (TfIdfVectorizer, ReduceL2) plus once by MatMul.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.feature_extraction.text import TfidfVectorizer

from classifiers.graph import CENTROID_COSINE, INPUT_NAME, PROBABILITIES
from classifiers.text import TOKEN_PATTERN

logger = logging.getLogger(__name__)

FEATURES = "features"
OPSET = 17
# Below any real TF-IDF norm (idf >= 1, counts >= 1): only an all-zero row hits it.
NORM_FLOOR = 1e-12


def _convert_front_end(vectorizer: TfidfVectorizer) -> onnx.ModelProto:
    """skl2onnx graph of the vectorizer: string [N, 1] -> tf-idf rows (before our surgery)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType

    return convert_sklearn(
        vectorizer,
        initial_types=[(INPUT_NAME, StringTensorType([None, 1]))],
        options={TfidfVectorizer: {"tokenexp": TOKEN_PATTERN, "locale": "C"}},
        target_opset=OPSET,
    )


def _fold_idf_into_ngram_op(graph: onnx.GraphProto, idf: np.ndarray) -> str:
    """Switch the TfIdfVectorizer node to TFIDF mode with idf weights; drop everything after.

    ONNX indexes ``weights`` by pool entry, and pool entry ``i`` feeds output column
    ``ngram_indexes[i]``, so ``weights[i] = idf[ngram_indexes[i]]``.
    Returns the name of the node's output (the unnormalised tf-idf rows).
    """
    nodes = list(graph.node)
    position = next(i for i, node in enumerate(nodes) if node.op_type == "TfIdfVectorizer")
    ngram_node = nodes[position]
    attributes = {attribute.name: attribute for attribute in ngram_node.attribute}
    pool_to_column = list(attributes["ngram_indexes"].ints)
    attributes["mode"].s = b"TFIDF"
    del attributes["weights"].floats[:]
    attributes["weights"].floats.extend(float(idf[column]) for column in pool_to_column)
    dropped = nodes[position + 1 :]
    for node in dropped:
        graph.node.remove(node)
    unused = {name for node in dropped for name in node.input}
    kept_initializers = [init for init in graph.initializer if init.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
    del graph.output[:]
    return str(ngram_node.output[0])


def _softmax_weights(coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights whose softmax equals sklearn's probabilities (binary: sigmoid = softmax([0, l]))."""
    if coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    return coef, intercept


def build_classifier_graph(
    vectorizer: TfidfVectorizer,
    coef: np.ndarray,
    intercept: np.ndarray,
    centroids: np.ndarray,
) -> onnx.ModelProto:
    """The whole classifier as one ONNX model: text [N, 1] -> probabilities, centroid_cosine."""
    front_end_source = copy.deepcopy(vectorizer)
    model = _convert_front_end(front_end_source)
    graph = model.graph
    tfidf = _fold_idf_into_ngram_op(graph, np.asarray(vectorizer.idf_, dtype=np.float64))
    weights, bias = _softmax_weights(np.asarray(coef), np.asarray(intercept))
    n_clusters = weights.shape[0]
    if centroids.shape != (n_clusters, weights.shape[1]):
        raise ValueError(f"centroids {centroids.shape} do not match weights {weights.shape}")
    projection = np.hstack([weights.T, centroids.T]).astype(np.float32)  # [V, 2K]
    graph.initializer.extend(
        [
            numpy_helper.from_array(projection, "projection"),
            numpy_helper.from_array(bias.astype(np.float32), "bias"),
            numpy_helper.from_array(np.array([NORM_FLOOR], np.float32), "norm_floor"),
            numpy_helper.from_array(np.array([n_clusters, n_clusters], np.int64), "split_sizes"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceL2", [tfidf], ["norm"], axes=[1], keepdims=1),
            helper.make_node("Max", ["norm", "norm_floor"], ["safe_norm"]),
            helper.make_node("MatMul", [tfidf, "projection"], ["projected"]),  # [N, 2K]
            helper.make_node("Div", ["projected", "safe_norm"], ["scaled"]),
            helper.make_node(
                "Split", ["scaled", "split_sizes"], ["logits", CENTROID_COSINE], axis=1
            ),
            helper.make_node("Add", ["logits", "bias"], ["biased_logits"]),
            helper.make_node("Softmax", ["biased_logits"], [PROBABILITIES], axis=1),
        ]
    )
    graph.output.extend(
        [
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [None, n_clusters]),
            helper.make_tensor_value_info(CENTROID_COSINE, TensorProto.FLOAT, [None, n_clusters]),
        ]
    )
    graph.name = "specroute_task_classifier"
    onnx.checker.check_model(model)
    return model
