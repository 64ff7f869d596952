"""The hand-built ONNX graph computes what the numpy reference computes, on a tiny random BERT."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from mongarsd.inference import onnx_convert as oc

TINY = {
    "model_type": "bert",
    "hidden_act": "gelu",
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "vocab_size": 50,
    "max_position_embeddings": 16,
    "type_vocab_size": 2,
}


def _random_weights(cfg: oc.BertConfig, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    h, f = cfg.hidden_size, cfg.intermediate_size

    def r(*shape: int) -> Any:
        return rng.normal(0, 0.2, size=shape).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": r(cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": r(cfg.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": r(cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": 1 + r(h),
        "embeddings.LayerNorm.bias": r(h),
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            w[f"{p}attention.self.{name}.weight"] = r(h, h)
            w[f"{p}attention.self.{name}.bias"] = r(h)
        w[p + "attention.output.dense.weight"] = r(h, h)
        w[p + "attention.output.dense.bias"] = r(h)
        w[p + "attention.output.LayerNorm.weight"] = 1 + r(h)
        w[p + "attention.output.LayerNorm.bias"] = r(h)
        w[p + "intermediate.dense.weight"] = r(f, h)
        w[p + "intermediate.dense.bias"] = r(f)
        w[p + "output.dense.weight"] = r(h, f)
        w[p + "output.dense.bias"] = r(h)
        w[p + "output.LayerNorm.weight"] = 1 + r(h)
        w[p + "output.LayerNorm.bias"] = r(h)
    return w


def _session(model: Any) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_graph_matches_reference_with_padding() -> None:
    cfg = oc.BertConfig.from_dict(TINY)
    w = _random_weights(cfg)
    model = oc.build_onnx_model(w, cfg)
    import onnx

    onnx.checker.check_model(model, full_check=True)
    ids = np.array([[1, 7, 9, 3, 2], [1, 4, 2, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    types = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=np.int64)
    hidden, sent = _session(model).run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    ref_hidden, ref_sent = oc.reference_forward(w, cfg, ids, mask, types)
    assert hidden.shape == (2, 5, 32)
    assert sent.shape == (2, 32)
    np.testing.assert_allclose(hidden, ref_hidden, atol=2e-4)
    np.testing.assert_allclose(sent, ref_sent, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(sent, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_the_sentence_embedding() -> None:
    cfg = oc.BertConfig.from_dict(TINY)
    w = _random_weights(cfg, seed=1)
    sess = _session(oc.build_onnx_model(w, cfg))
    short = {
        "input_ids": np.array([[1, 4, 2]], dtype=np.int64),
        "attention_mask": np.ones((1, 3), dtype=np.int64),
        "token_type_ids": np.zeros((1, 3), dtype=np.int64),
    }
    padded = {
        "input_ids": np.array([[1, 4, 2, 0, 0, 0]], dtype=np.int64),
        "attention_mask": np.array([[1, 1, 1, 0, 0, 0]], dtype=np.int64),
        "token_type_ids": np.zeros((1, 6), dtype=np.int64),
    }
    (a,) = sess.run(["sentence_embedding"], short)
    (b,) = sess.run(["sentence_embedding"], padded)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_missing_tensor_is_a_conversion_error() -> None:
    cfg = oc.BertConfig.from_dict(TINY)
    w = _random_weights(cfg)
    del w["encoder.layer.1.output.dense.bias"]
    with pytest.raises(oc.ConversionError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        oc.build_onnx_model(w, cfg)


def test_wrong_shape_is_a_conversion_error() -> None:
    cfg = oc.BertConfig.from_dict(TINY)
    w = _random_weights(cfg)
    w["encoder.layer.0.intermediate.dense.weight"] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(oc.ConversionError, match="shape"):
        oc.build_onnx_model(w, cfg)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"model_type": "roberta"}, "model_type"),
        ({"num_attention_heads": 5}, "multiple"),
        ({"position_embedding_type": "relative_key"}, "absolute"),
        ({"hidden_size": "x"}, "config.json"),
    ],
)
def test_unsupported_config_is_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(oc.ConversionError, match=message):
        oc.BertConfig.from_dict({**TINY, **change})


def test_reference_gelu_is_exact_erf_gelu() -> None:
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0], dtype=np.float32)
    # GELU values from the closed form with math.erf, independent of the helper.
    import math

    expected = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.tolist()]
    np.testing.assert_allclose(oc._gelu_erf(x), expected, rtol=1e-6, atol=1e-7)


def test_quantize_rows_round_trip_is_within_half_a_step() -> None:
    rng = np.random.default_rng(3)
    table = rng.normal(0, 0.1, size=(40, 16)).astype(np.float32)
    table[5] = 0.0  # an all-zero row must not divide by zero
    table[7, 3] = 4.0  # one outlier only coarsens its own row
    q, scale = oc.quantize_rows(table)
    assert q.dtype == np.int8
    assert scale.shape == (40, 1)
    assert scale.dtype == np.float32
    assert int(np.abs(q.astype(np.int16)).max()) <= 127
    back = oc.dequantize_rows(q, scale)
    assert np.all(np.abs(back - table) <= scale / 2 + 1e-7)
    np.testing.assert_array_equal(back[5], 0.0)
    others = np.delete(np.arange(40), [7])
    assert float(np.abs(back[others] - table[others]).max()) < 0.1 * 4 / 254  # unaffected by row 7's outlier


def test_int8_word_table_graph_computes_the_dequantized_table() -> None:
    cfg = oc.BertConfig.from_dict(TINY)
    w = _random_weights(cfg, seed=2)
    model = oc.build_onnx_model(w, cfg, int8_word_table=True)
    import onnx

    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    assert "embeddings.word_embeddings.weight" not in inits
    assert inits["embeddings.word_embeddings.weight_int8"].data_type == onnx.TensorProto.INT8
    ids = np.array([[1, 7, 9, 3, 2], [1, 49, 2, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    types = np.zeros_like(ids)
    hidden, sent = _session(model).run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    dq = dict(w)
    dq["embeddings.word_embeddings.weight"] = oc.dequantize_rows(*oc.quantize_rows(w["embeddings.word_embeddings.weight"]))
    ref_hidden, ref_sent = oc.reference_forward(dq, cfg, ids, mask, types)
    np.testing.assert_allclose(hidden, ref_hidden, atol=2e-4)
    np.testing.assert_allclose(sent, ref_sent, atol=2e-5)


def test_model_records_the_converter_version() -> None:
    cfg = oc.BertConfig.from_dict(TINY)
    model = oc.build_onnx_model(_random_weights(cfg), cfg)
    meta = _session(model).get_modelmeta().custom_metadata_map
    assert oc.model_convert_version(meta) == oc.CONVERT_VERSION
    assert oc.model_convert_version({}) is None  # a file from an older recipe, or not ours


def _feeds() -> dict[str, Any]:
    ids = np.array([[1, 7, 9, 3, 2], [1, 4, 2, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_outlier_channels_on_a_side_path_compute_the_same_function() -> None:
    cfg = oc.BertConfig.from_dict(TINY)
    w = _random_weights(cfg, seed=3)
    split = {0: [5, 63], 1: [0]}
    model = oc.build_onnx_model(w, cfg, outlier_channels=split)
    import onnx

    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    # the main path lost exactly those channels; the side path has them
    assert inits["encoder.layer.0.intermediate.dense.weight_t"].shape == (32, 62)
    assert inits["encoder.layer.0.output.dense.weight_t"].shape == (62, 32)
    assert inits["encoder.layer.1.output.dense.weight_t"].shape == (63, 32)
    np.testing.assert_array_equal(inits["encoder.layer.0.outlier.down_weight"], w["encoder.layer.0.output.dense.weight"][:, [5, 63]].T)
    side = sorted(n.name for n in model.graph.node if oc.OUTLIER_PATH in n.name and n.op_type == "MatMul")
    assert side == [f"encoder.layer.{i}.{oc.OUTLIER_PATH}.{s}" for i in (0, 1) for s in ("down", "up")]
    feeds = _feeds()
    hidden, sent = _session(model).run(None, feeds)
    ref_hidden, ref_sent = oc.reference_forward(w, cfg, feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"])
    np.testing.assert_allclose(hidden, ref_hidden, atol=2e-4)
    np.testing.assert_allclose(sent, ref_sent, atol=2e-5)


def test_fast_gelu_stays_within_its_approximation() -> None:
    cfg = oc.BertConfig.from_dict(TINY)
    w = _random_weights(cfg, seed=4)
    model = oc.build_onnx_model(w, cfg, fast_gelu=True, outlier_channels={1: [3]})
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("FastGelu") == cfg.num_layers
    assert "Erf" in ops  # the fp32 outlier path keeps the exact GELU
    typed = {v.name for v in model.graph.value_info}
    assert all(n.output[0] in typed for n in model.graph.node if n.op_type == "FastGelu")  # for the quantiser
    feeds = _feeds()
    _, sent = _session(model).run(None, feeds)
    _, ref_sent = oc.reference_forward(w, cfg, feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"])
    assert float((sent * ref_sent).sum(axis=1).min()) > 0.9999
    assert not np.allclose(sent, ref_sent, atol=1e-7)  # really the approximation, not the erf form


def test_outlier_ffn_channels_picks_channels_far_above_the_layer_median() -> None:
    base = np.ones(100, dtype=np.float32)
    layer0 = base.copy()
    layer0[[7, 42]] = [25.0, 11.0]
    layer1 = base.copy()
    layer1[3] = 9.9  # under the factor: quantised with the rest
    calib = {"encoder.layer.0.output.dense": layer0, "encoder.layer.1.output.dense": layer1}
    assert oc.outlier_ffn_channels(calib, num_layers=3) == {0: [7, 42]}
    assert oc.outlier_ffn_channels(calib, num_layers=3, factor=5.0) == {0: [7, 42], 1: [3]}
    assert oc.outlier_ffn_channels({}, num_layers=2) == {}
