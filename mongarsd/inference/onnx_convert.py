"""Build an ONNX graph for a BERT sentence encoder (all-MiniLM-L6-v2) from safetensors, no torch.

The graph is written op by op with `onnx.helper` from the checkpoint's weights, and a plain
numpy forward pass of the same weights (`reference_forward`) proves the conversion in tests.
Layout follows Hugging Face `BertModel` (post-LayerNorm encoder, absolute positions, GELU with
erf) followed by the sentence-transformers modules of the checkpoint: mean pooling over the
attention mask, then L2 normalisation (modules.json lists Transformer, Pooling, Normalize).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

# Bump when the graph or quantisation recipe changes: the installer then converts again, and
# the Embedder warns about a model file written by an older recipe (`METADATA_CONVERT_VERSION`).
CONVERT_VERSION: Final = "4"
METADATA_CONVERT_VERSION: Final = "mongarsd.convert_version"
OPSET: Final = 17  # LayerNormalization is a standard op from opset 17
IR_VERSION: Final = 8  # readable by onnxruntime >= 1.10 (older Pi images)
MS_DOMAIN: Final = "com.microsoft"  # ONNX Runtime's contrib operators (FastGelu)
# Additive bias for padded key positions (classic BERT value); exp() underflows to exactly 0.
MASK_BIAS: Final = -10000.0
POOL_MIN_TOKENS: Final = 1e-9  # sentence-transformers clamps the mask sum to this
NORMALIZE_EPS: Final = 1e-12  # torch.nn.functional.normalize default eps

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class ConversionError(Exception):
    """The checkpoint cannot be converted (missing tensor, wrong shape, unsupported config)."""


@dataclass(frozen=True, slots=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder, read from config.json."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int

    @property
    def head_dim(self) -> int:
        """Return the size of one attention head."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> BertConfig:
        """Validate a Hugging Face config.json mapping and build the config."""
        if raw.get("model_type", "bert") != "bert":
            raise ConversionError(f"unsupported model_type {raw.get('model_type')!r}")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ConversionError(f"unsupported hidden_act {raw.get('hidden_act')!r}")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ConversionError("only absolute position embeddings are supported")
        try:
            cfg = cls(
                num_layers=int(raw["num_hidden_layers"]),
                hidden_size=int(raw["hidden_size"]),
                num_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]),
                layer_norm_eps=float(raw["layer_norm_eps"]),
                vocab_size=int(raw["vocab_size"]),
                max_position_embeddings=int(raw["max_position_embeddings"]),
                type_vocab_size=int(raw["type_vocab_size"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConversionError(f"bad config.json: {err}") from err
        if cfg.hidden_size % cfg.num_heads:
            raise ConversionError("hidden_size is not a multiple of num_attention_heads")
        return cfg

    @classmethod
    def load(cls, path: Path) -> BertConfig:
        """Read config.json (blocking file I/O)."""
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def load_weights(path: Path) -> dict[str, FloatArray]:
    """Read a safetensors checkpoint into float32 numpy arrays (blocking file I/O)."""
    from safetensors.numpy import load_file

    raw = load_file(str(path))
    # Some exports prefix every name with "bert." (BertForX heads); strip it.
    out: dict[str, FloatArray] = {}
    for key, value in raw.items():
        name = key.removeprefix("bert.")
        if value.dtype.kind == "f":
            out[name] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _need(weights: Mapping[str, FloatArray], name: str, shape: tuple[int, ...]) -> FloatArray:
    try:
        value = weights[name]
    except KeyError:
        raise ConversionError(f"checkpoint lacks tensor {name}") from None
    if tuple(value.shape) != shape:
        raise ConversionError(f"tensor {name} has shape {tuple(value.shape)}, expected {shape}")
    return value


# --------------------------------------------------------------------------- numpy reference


def _layer_norm(x: FloatArray, gamma: FloatArray, beta: FloatArray, eps: float) -> FloatArray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return np.asarray(((x - mean) / np.sqrt(var + eps)) * gamma + beta, dtype=np.float32)


_ERF = np.frompyfunc(math.erf, 1, 1)


def _gelu_erf(x: FloatArray) -> FloatArray:
    # Exact GELU via math.erf (float64), independent of the graph's Erf op.
    erf = np.asarray(_ERF(x.astype(np.float64) / math.sqrt(2.0)), dtype=np.float64)
    return (0.5 * x.astype(np.float64) * (1.0 + erf)).astype(np.float32)


def _softmax(x: FloatArray) -> FloatArray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float32)


def reference_forward(
    weights: Mapping[str, FloatArray],
    config: BertConfig,
    input_ids: IntArray,
    attention_mask: IntArray,
    token_type_ids: IntArray,
    *,
    calib: dict[str, FloatArray] | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Run the encoder in plain numpy; return (last_hidden_state, sentence_embedding).

    With `calib`, record for every linear layer the max |input| per input channel (for
    SmoothQuant scales), merged with what the dict already holds.
    """
    c = config
    batch, seq = input_ids.shape
    w = weights
    x = (
        _need(w, "embeddings.word_embeddings.weight", (c.vocab_size, c.hidden_size))[input_ids]
        + _need(w, "embeddings.position_embeddings.weight", (c.max_position_embeddings, c.hidden_size))[np.arange(seq)][None, :, :]
        + _need(w, "embeddings.token_type_embeddings.weight", (c.type_vocab_size, c.hidden_size))[token_type_ids]
    )
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], c.layer_norm_eps)
    bias = (1.0 - attention_mask.astype(np.float32))[:, None, None, :] * MASK_BIAS
    for i in range(c.num_layers):
        p = f"encoder.layer.{i}."

        def dense(h: FloatArray, name: str, p: str = p) -> FloatArray:
            if calib is not None:
                amax = np.abs(h).reshape(-1, h.shape[-1]).max(axis=0)
                prev = calib.get(p + name)
                calib[p + name] = amax if prev is None else np.maximum(prev, amax)
            return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        def heads(h: FloatArray) -> FloatArray:
            return h.reshape(batch, seq, c.num_heads, c.head_dim).transpose(0, 2, 1, 3)

        q = heads(dense(x, "attention.self.query"))
        k = heads(dense(x, "attention.self.key"))
        v = heads(dense(x, "attention.self.value"))
        scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(c.head_dim) + bias
        ctx = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, c.hidden_size)
        x = _layer_norm(
            dense(ctx, "attention.output.dense") + x,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            c.layer_norm_eps,
        )
        ff = dense(_gelu_erf(dense(x, "intermediate.dense")), "output.dense")
        x = _layer_norm(ff + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], c.layer_norm_eps)
    hidden = x.astype(np.float32)
    mask = attention_mask.astype(np.float32)[:, :, None]
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), POOL_MIN_TOKENS)
    norm = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), NORMALIZE_EPS)
    return hidden, (pooled / norm).astype(np.float32)


# --------------------------------------------------------------------------- ONNX graph


class _GraphBuilder:
    """Accumulate nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.value_infos: list[Any] = []
        self._n = 0

    def const(self, name: str, value: npt.NDArray[Any]) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, *, out: str = "", **attrs: Any) -> str:
        from onnx import helper

        self._n += 1
        out = out or f"{hint}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def quantize_rows(table: FloatArray) -> tuple[npt.NDArray[np.int8], FloatArray]:
    """Quantise each row to int8 with its own symmetric scale; return (int8 rows, scales [rows, 1]) (pure).

    The word-embedding table is 47 MB in fp32 (30522 x 384), most of the int8 model: stored
    per row in int8 it is 12 MB, and a row's error stays below half a step of that row's scale.
    """
    amax = np.abs(table).max(axis=1, keepdims=True)
    scale = (np.maximum(amax, np.finfo(np.float32).tiny) / 127.0).astype(np.float32)
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows(q: npt.NDArray[np.int8], scale: FloatArray) -> FloatArray:
    """Undo `quantize_rows` (pure): what the int8 table's graph computes for each row."""
    return (q.astype(np.float32) * scale).astype(np.float32)


def smooth_scales(weights: Mapping[str, FloatArray], calib: Mapping[str, FloatArray], alpha: float = 0.5) -> dict[str, FloatArray]:
    """Return SmoothQuant per-input-channel scales s = max|X|^a / max|W|^(1-a) for each linear.

    Dividing a linear's input by s and multiplying its weight rows by s is exact in real
    arithmetic; it moves BERT's activation outlier channels into the weights, where per-channel
    int8 quantisation absorbs them (Xiao et al., SmoothQuant, 2023, section 4).
    """
    out: dict[str, FloatArray] = {}
    for name, amax in calib.items():
        wmax = np.abs(weights[name + ".weight"]).max(axis=0)  # [n_in]
        s = np.power(np.maximum(amax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1.0 - alpha)
        out[name] = np.clip(s, 1e-4, 1e4).astype(np.float32)
    return out


def build_onnx_model(
    weights: Mapping[str, FloatArray],
    config: BertConfig,
    smooth: Mapping[str, FloatArray] | None = None,
    *,
    int8_word_table: bool = False,
    outlier_channels: Mapping[int, Sequence[int]] | None = None,
    fast_gelu: bool = False,
) -> Any:
    """Return an `onnx.ModelProto` for the encoder plus mean pooling and L2 normalisation.

    With `smooth` (from `smooth_scales`), each listed linear layer gets its input divided by
    the scales and its weight rows multiplied by them: the same function, easier to quantise.
    With `int8_word_table`, the word embeddings are stored as `quantize_rows` int8 rows and
    dequantised in the graph after the Gather (only the looked-up rows are ever widened).
    With `outlier_channels` (layer -> FFN channels, from `outlier_ffn_channels`), those
    channels of a layer's feed-forward block get a path of their own, `OUTLIER_PATH` nodes
    that quantisation must skip: the main path's FFN has their columns and rows removed, the
    side path computes them (up-projection column, GELU, down-projection row) and adds them
    back. The same function; the down-projection's input then has no outlier left to set its
    int8 scale. With `fast_gelu`, the FFN's GELU is ONNX Runtime's FastGelu (tanh
    approximation, com.microsoft domain): 1.6x faster than the erf form, within 5e-4 of it.
    """
    from onnx import TensorProto, helper

    c = config
    g = _GraphBuilder()
    w = weights

    def linear(x: str, name: str, n_in: int, n_out: int, hint: str, *, drop_in: Sequence[int] = (), drop_out: Sequence[int] = ()) -> str:
        # MatMul + Add (not Gemm) so dynamic quantisation and ORT's fusions recognise it.
        # `drop_in`/`drop_out`: input rows / output columns left to an outlier path.
        weight = _need(w, name + ".weight", (n_out, n_in))
        bias = _need(w, name + ".bias", (n_out,))
        weight_t = np.delete(np.delete(weight.T, list(drop_in), axis=0), list(drop_out), axis=1)
        bias = np.delete(bias, list(drop_out))
        if smooth is not None and name in smooth:
            s = np.delete(smooth[name], list(drop_in))
            x = g.op("Mul", [x, g.const(name + ".smooth_inv", (1.0 / s).astype(np.float32))], hint + "_sm")
            weight_t = weight_t * s[:, None]
        # Stable node name so the quantiser can be told to skip a given layer.
        mm = g.op("MatMul", [x, g.const(name + ".weight_t", weight_t)], hint + "_mm", out=name + ".matmul")
        return g.op("Add", [mm, g.const(name + ".bias", bias)], hint)

    def gelu(t: str, hint: str, *, fast: bool = False, width: int = 0) -> str:
        if fast:  # ORT's tanh approximation, within 5e-4 of the exact GELU
            out = g.op("FastGelu", [t], hint + "_fgelu", domain=MS_DOMAIN)
            # onnx's shape inference knows no com.microsoft op: type its output for the quantiser
            g.value_infos.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "sequence", width]))
            return out
        # GELU(x) = 0.5 * x * (1 + erf(x / sqrt(2))); ORT fuses this pattern into one Gelu kernel.
        erf = g.op(
            "Erf", [g.op("Div", [t, g.const(hint + "_sqrt2", np.array(math.sqrt(2.0), dtype=np.float32))], hint + "_d")], hint + "_erf"
        )
        one = g.const(hint + "_one_f", np.array(1.0, dtype=np.float32))
        half = g.const(hint + "_half", np.array(0.5, dtype=np.float32))
        return g.op("Mul", [g.op("Mul", [t, g.op("Add", [erf, one], f"{hint}_e1")], f"{hint}_xe"), half], f"{hint}_gelu")

    def outlier_path(x: str, p: str, channels: Sequence[int], hint: str) -> str:
        # The FFN restricted to `channels`, in fp32: x @ W1[:, C] + b1[C] -> GELU -> @ W2[C, :].
        cols = list(channels)
        w1 = _need(w, p + "intermediate.dense.weight", (c.intermediate_size, c.hidden_size))[cols].T
        b1 = _need(w, p + "intermediate.dense.bias", (c.intermediate_size,))[cols]
        w2 = _need(w, p + "output.dense.weight", (c.hidden_size, c.intermediate_size))[:, cols].T
        up = g.op("MatMul", [x, g.const(p + "outlier.up_weight", w1)], hint, out=p + OUTLIER_PATH + ".up")
        act = gelu(g.op("Add", [up, g.const(p + "outlier.up_bias", b1)], hint + "_b"), hint)
        return g.op("MatMul", [act, g.const(p + "outlier.down_weight", w2)], hint, out=p + OUTLIER_PATH + ".down")

    def layer_norm(x: str, name: str) -> str:
        gamma = _need(w, name + ".weight", (c.hidden_size,))
        beta = _need(w, name + ".bias", (c.hidden_size,))
        return g.op(
            "LayerNormalization",
            [x, g.const(name + ".weight", gamma), g.const(name + ".bias", beta)],
            "ln",
            axis=-1,
            epsilon=c.layer_norm_eps,
        )

    # Embeddings: word + position (0..S-1) + token type, then LayerNorm.
    table = _need(w, "embeddings.word_embeddings.weight", (c.vocab_size, c.hidden_size))
    if int8_word_table:
        table_q, row_scale = quantize_rows(table)
        rows = g.op("Gather", [g.const("embeddings.word_embeddings.weight_int8", table_q), "input_ids"], "word_q")
        scales = g.op("Gather", [g.const("embeddings.word_embeddings.row_scale", row_scale), "input_ids"], "word_s")
        word = g.op("Mul", [g.op("Cast", [rows], "word_qf", to=TensorProto.FLOAT), scales], "word_emb")
    else:
        word = g.op("Gather", [g.const("embeddings.word_embeddings.weight", table), "input_ids"], "word_emb")
    # Positions 0..S-1 are the first S rows of the table: Slice by the sequence length.
    seq_len = g.op("Shape", ["input_ids"], "seq_len", start=1, end=2)
    pos = g.op(
        "Slice",
        [
            g.const(
                "embeddings.position_embeddings.weight",
                _need(w, "embeddings.position_embeddings.weight", (c.max_position_embeddings, c.hidden_size)),
            ),
            g.const("zero_1d", np.array([0], dtype=np.int64)),
            seq_len,
            g.const("axis0_1d", np.array([0], dtype=np.int64)),
        ],
        "pos_emb",
    )
    tok = g.op(
        "Gather",
        [
            g.const(
                "embeddings.token_type_embeddings.weight",
                _need(w, "embeddings.token_type_embeddings.weight", (c.type_vocab_size, c.hidden_size)),
            ),
            "token_type_ids",
        ],
        "type_emb",
    )
    emb = g.op("Add", [g.op("Add", [word, pos], "emb_wp"), tok], "emb")
    x = layer_norm(emb, "embeddings.LayerNorm")

    # Attention bias [B,1,1,S]: 0 for tokens, MASK_BIAS for padding.
    mask_f = g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inv = g.op("Sub", [g.const("one_f", np.array(1.0, dtype=np.float32)), mask_f], "mask_inv")
    bias_2d = g.op("Mul", [inv, g.const("mask_bias", np.array(MASK_BIAS, dtype=np.float32))], "mask_bias2d")
    att_bias = g.op("Unsqueeze", [bias_2d, g.const("axes_1_2", np.array([1, 2], dtype=np.int64))], "att_bias")

    split_shape = g.const("split_heads_shape", np.array([0, 0, c.num_heads, c.head_dim], dtype=np.int64))
    merge_shape = g.const("merge_heads_shape", np.array([0, 0, c.hidden_size], dtype=np.int64))
    scale = g.const("att_scale", np.array(1.0 / math.sqrt(c.head_dim), dtype=np.float32))

    for i in range(c.num_layers):
        p = f"encoder.layer.{i}."
        h = c.hidden_size

        def heads(t: str, perm: list[int], hint: str) -> str:
            return g.op("Transpose", [g.op("Reshape", [t, split_shape], hint + "_r")], hint, perm=perm)

        q = heads(linear(x, p + "attention.self.query", h, h, f"l{i}_q"), [0, 2, 1, 3], f"l{i}_qh")
        k = heads(linear(x, p + "attention.self.key", h, h, f"l{i}_k"), [0, 2, 3, 1], f"l{i}_kh")
        v = heads(linear(x, p + "attention.self.value", h, h, f"l{i}_v"), [0, 2, 1, 3], f"l{i}_vh")
        scores = g.op("Mul", [g.op("MatMul", [q, k], f"l{i}_qk"), scale], f"l{i}_scaled")
        probs = g.op("Softmax", [g.op("Add", [scores, att_bias], f"l{i}_masked")], f"l{i}_probs", axis=-1)
        ctx = g.op("MatMul", [probs, v], f"l{i}_ctx")
        ctx = g.op(
            "Reshape",
            [g.op("Transpose", [ctx], f"l{i}_ctx_t", perm=[0, 2, 1, 3]), merge_shape],
            f"l{i}_ctx_m",
        )
        att = linear(ctx, p + "attention.output.dense", h, h, f"l{i}_ao")
        x = layer_norm(g.op("Add", [att, x], f"l{i}_res1"), p + "attention.output.LayerNorm")
        split = sorted(set((outlier_channels or {}).get(i, ())))
        inter = linear(x, p + "intermediate.dense", h, c.intermediate_size, f"l{i}_ff1", drop_out=split)
        ff = linear(
            gelu(inter, f"l{i}", fast=fast_gelu, width=c.intermediate_size - len(split)),
            p + "output.dense",
            c.intermediate_size,
            h,
            f"l{i}_ff2",
            drop_in=split,
        )
        if split:
            ff = g.op("Add", [ff, outlier_path(x, p, split, f"l{i}_ffo")], f"l{i}_ff")
        x = layer_norm(g.op("Add", [ff, x], f"l{i}_res2"), p + "output.LayerNorm")

    hidden = g.op("Identity", [x], "hidden", out="last_hidden_state")

    # Mean pooling over real tokens, then L2 normalisation (sentence-transformers modules 1 and 2).
    mask_3d = g.op("Unsqueeze", [mask_f, g.const("axes_2", np.array([2], dtype=np.int64))], "mask_3d")
    axis1 = g.const("axes_1", np.array([1], dtype=np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [hidden, mask_3d], "masked_hidden"), axis1], "sum_hidden", keepdims=0)
    count = g.op(
        "Max",
        [
            g.op("ReduceSum", [mask_3d, axis1], "mask_count", keepdims=0),
            g.const("pool_min", np.array(POOL_MIN_TOKENS, dtype=np.float32)),
        ],
        "mask_count_c",
    )
    pooled = g.op("Div", [summed, count], "pooled")
    norm = g.op(
        "Max",
        [
            g.op("ReduceL2", [pooled], "pooled_norm", axes=[1], keepdims=1),
            g.const("norm_eps", np.array(NORMALIZE_EPS, dtype=np.float32)),
        ],
        "pooled_norm_c",
    )
    g.op("Div", [pooled, norm], "sentence", out="sentence_embedding")

    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outputs = [
        helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", c.hidden_size]),
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", c.hidden_size]),
    ]
    graph = helper.make_graph(g.nodes, "bert_sentence_encoder", inputs, outputs, initializer=g.inits, value_info=g.value_infos)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="mongarsd.onnx_convert",
        ir_version=IR_VERSION,
    )
    helper.set_model_props(model, {METADATA_CONVERT_VERSION: CONVERT_VERSION})
    return model


def model_convert_version(metadata: Mapping[str, str]) -> str | None:
    """Return the converter version recorded in a model's metadata, None for a foreign or old file (pure)."""
    return metadata.get(METADATA_CONVERT_VERSION)


def convert_checkpoint(model_dir: Path, out_path: Path) -> Path:
    """Convert `model_dir`'s safetensors + config.json to fp32 ONNX at `out_path` (blocking)."""
    import onnx

    config = BertConfig.load(model_dir / "config.json")
    weights = load_weights(model_dir / "model.safetensors")
    model = build_onnx_model(weights, config)
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(out_path))
    return out_path


# Sentences used only to measure activation ranges for SmoothQuant (never the test sentences).
CALIBRATION_TEXTS: Final = (
    "A man is playing a guitar.",
    "What is the weather like in Montreal tomorrow?",
    "Please summarise the following document in three bullet points.",
    "The patient was given 5 mg of the drug twice daily.",
    "I can't believe it's already December!",
    "SELECT * FROM users WHERE id = 42;",
    "La vie est belle.",
    "Neural networks learn representations from data.",
    "hi",
    "Thank you so much for your help yesterday, it really made a difference.",
    "no",
    "Sure.",
)
SMOOTH_ALPHA: Final = 0.5
# Linears whose input is a LayerNorm output: their outlier channels are what SmoothQuant fixes.
SMOOTHED_LINEARS: Final = ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense")
# An FFN channel whose calibrated max |GELU output| is this many times its layer's median
# channel max gets an fp32 path of its own (`outlier_ffn_channels`). MiniLM has five such
# channels in layers 0-3, 14-27x the median; the next ones are under 7x. Left in, the largest
# set the per-tensor int8 scale of the down-projection's input: layer 0's was kept in fp32 for
# that (its int8 version cost ~0.01 cosine on short texts) and ran at half the speed.
OUTLIER_FACTOR: Final = 10.0
OUTLIER_PATH: Final = "outlier"  # node-name part of the fp32 side paths, which quantisation skips


def outlier_ffn_channels(calib: Mapping[str, FloatArray], num_layers: int, factor: float = OUTLIER_FACTOR) -> dict[int, list[int]]:
    """Return layer -> FFN channels whose max |activation| exceeds `factor` x the layer's median (pure)."""
    out: dict[int, list[int]] = {}
    for i in range(num_layers):
        amax = calib.get(f"encoder.layer.{i}.output.dense")
        if amax is None or amax.size == 0:
            continue
        channels = np.flatnonzero(amax > factor * float(np.median(amax)))
        if channels.size:
            out[i] = [int(ch) for ch in channels]
    return out


def calibrate(weights: Mapping[str, FloatArray], config: BertConfig, tokenizer_path: Path, texts: Sequence[str]) -> dict[str, FloatArray]:
    """Return max |input| per channel of every linear over `texts`, one text at a time (blocking)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.enable_truncation(max_length=256)
    calib: dict[str, FloatArray] = {}
    for text in texts:
        enc = tok.encode(text)
        ids = np.array([enc.ids], dtype=np.int64)
        reference_forward(weights, config, ids, np.ones_like(ids), np.array([enc.type_ids], dtype=np.int64), calib=calib)
    return calib


def convert_int8(model_dir: Path, out_path: Path) -> Path:
    """Write the int8 model: SmoothQuant-scaled graph, dynamic quantisation, int8 weights (blocking).

    Weights are 7-bit QInt8 per output channel, activations uint8 per tensor (quantize_dynamic);
    the word-embedding table is int8 per row (`quantize_rows`); the FFN's outlier channels
    stay in fp32 on a path of their own (`outlier_ffn_channels`).
    """
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    config = BertConfig.load(model_dir / "config.json")
    weights = load_weights(model_dir / "model.safetensors")
    calib = calibrate(weights, config, model_dir / "tokenizer.json", CALIBRATION_TEXTS)
    scales = {name: s for name, s in smooth_scales(weights, calib, SMOOTH_ALPHA).items() if name.split(".", 3)[-1] in SMOOTHED_LINEARS}
    outliers = outlier_ffn_channels(calib, config.num_layers)
    model = build_onnx_model(weights, config, scales, int8_word_table=True, outlier_channels=outliers, fast_gelu=True)
    del weights
    onnx.checker.check_model(model, full_check=True)
    # quantize_dynamic writes "<src>-inferred.onnx" beside its input: keep it in a private dir.
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".int8-work-") as work:
        src = Path(work) / "smoothed.onnx"
        onnx.save_model(model, str(src))
        fp32_nodes = [node.name for node in model.graph.node if OUTLIER_PATH in node.name]
        del model
        quantize_dynamic(
            str(src),
            str(out_path),
            weight_type=QuantType.QInt8,
            per_channel=True,
            # 7-bit weights: x86 without VNNI multiplies uint8 x int8 with VPMADDUBSW, whose int16
            # pair sums saturate on full-range weights; that cost up to 0.04 cosine on short
            # texts (0.954 -> 0.983 minimum over tests/integration/test_embed.py's varied set).
            reduce_range=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=fp32_nodes,
        )
    return out_path
