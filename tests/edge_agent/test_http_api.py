"""The local HTTP API: Open Inference Protocol v2 with the official Triton client, plain JSON,
feedback, errors and readiness, against real bundles on a real server on a loopback port."""

from __future__ import annotations

import gzip
import http.client
import queue
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from edge_agent.bundle import load_public_key, read_bundle
from edge_agent.model import BundleModel
from tests.conftest import make_classification_data, make_regression_data
from tests.edge_agent.conftest import Served, sensor_frame, signal_windows

ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]+$")
REPO = Path(__file__).resolve().parents[2]


def _bundle_model(path: Path, keypair: Any) -> BundleModel:
    """The bundle's own model, loaded apart from the agent."""
    return BundleModel.from_bundle(read_bundle(path, [load_public_key(keypair.public_path)]))


def _client(served: Served) -> Any:
    return triton.InferenceServerClient(url=served.address, network_timeout=30)


def _rows(n: int = 5) -> np.ndarray:
    X, _ = make_classification_data(n=600, d=6, seed=11)
    return np.ascontiguousarray(X[-n:], dtype=np.float32)


def _texts(arr: np.ndarray) -> list[str]:
    """A BYTES output as text (tritonclient gives bytes for binary outputs, str for JSON)."""
    return [v.decode() if isinstance(v, bytes) else v for v in arr.reshape(-1)]


def _infer_input(name: str, arr: np.ndarray, datatype: str, binary: bool) -> Any:
    tensor = triton.InferInput(name, list(arr.shape), datatype)
    tensor.set_data_from_numpy(arr, binary_data=binary)
    return tensor


# --- the official Triton client ------------------------------------------------------------


def test_triton_health_and_metadata(served_classifier: Served, small_bundle: Any) -> None:
    """Liveness, readiness, model readiness and metadata answer what tritonclient expects."""
    m = small_bundle.manifest
    with _client(served_classifier) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("small") and client.is_model_ready("small", m.version)
        assert not client.is_model_ready("small", "9.9.9")
        assert not client.is_model_ready("other")
        meta = client.get_server_metadata()
        assert meta["name"] == "edgefleet" and "binary_tensor_data" in meta["extensions"]
        model = client.get_model_metadata("small", m.version)
        assert model == client.get_model_metadata("small")
    assert model["name"] == "small" and model["versions"] == ["1.2.0"]
    assert model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 6]}]
    assert model["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "prediction_id", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("outputs", [None, True, False],
                         ids=["all-outputs", "binary-outputs", "json-outputs"])
def test_triton_infer_classifier(served_classifier: Served, small_bundle: Any, keypair: Any,
                                 binary_in: bool, outputs: bool | None) -> None:
    """Inference through tritonclient equals agent.predict and the bundle's own model."""
    X = _rows()
    requested = None if outputs is None else [
        triton.InferRequestedOutput(n, binary_data=outputs)
        for n in ("label", "probabilities", "prediction_id")]
    with _client(served_classifier) as client:
        result = client.infer("small", [_infer_input("input", X, "FP32", binary_in)],
                              outputs=requested, request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_version"] == "1.2.0"
    binary = outputs is not False
    assert all(("parameters" in o) == binary for o in response["outputs"])
    labels = _texts(result.as_numpy("label"))
    proba = result.as_numpy("probabilities")
    ids = _texts(result.as_numpy("prediction_id"))
    assert proba.dtype == np.float32 and proba.shape == (5, 2)
    direct = served_classifier.agent.predict(X)
    own = _bundle_model(small_bundle.path, keypair).predict(X)
    assert labels == list(direct.labels) == list(own.labels)
    np.testing.assert_array_equal(proba, direct.probabilities)
    assert own.probabilities is not None
    np.testing.assert_allclose(proba, own.probabilities, atol=1e-6)
    assert len(set(ids)) == 5 and all(ID.match(i) for i in ids)


def test_triton_selected_outputs_and_compressed_request(served_classifier: Served) -> None:
    """Only the requested outputs come back, in order; a gzip request body is accepted."""
    X = _rows(3)
    with _client(served_classifier) as client:
        result = client.infer(
            "small", [_infer_input("input", X, "FP32", True)],
            outputs=[triton.InferRequestedOutput("probabilities", binary_data=False),
                     triton.InferRequestedOutput("label", binary_data=True)],
            request_compression_algorithm="gzip")
    names = [o["name"] for o in result.get_response()["outputs"]]
    assert names == ["probabilities", "label"]
    assert result.as_numpy("prediction_id") is None
    assert result.as_numpy("probabilities").shape == (3, 2)


def test_triton_accepts_fp64_and_int_inputs(served_classifier: Served) -> None:
    """FP64 and INT64 inputs are converted to FP32 and give the FP32 answer."""
    X = np.round(_rows(4))
    with _client(served_classifier) as client:
        want = client.infer("small", [_infer_input("input", X, "FP32", True)])
        for arr, dt in ((X.astype(np.float64), "FP64"), (X.astype(np.int64), "INT64")):
            got = client.infer("small", [_infer_input("input", arr, dt, True)])
            np.testing.assert_array_equal(got.as_numpy("probabilities"),
                                          want.as_numpy("probabilities"))


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
def test_triton_infer_named_columns_with_text(served_columns: Served, columns_bundle: Any,
                                              keypair: Any, binary_in: bool) -> None:
    """A columns bundle takes one tensor per column, BYTES for text, and answers like the model."""
    X, _ = sensor_frame(40, seed=9)
    with _client(served_columns) as client:
        meta = client.get_model_metadata("sensors")
        assert meta["inputs"] == [
            {"name": "temp", "datatype": "FP32", "shape": [-1, 1]},
            {"name": "pressure", "datatype": "FP32", "shape": [-1, 1]},
            {"name": "color", "datatype": "BYTES", "shape": [-1, 1]}]
        inputs = [
            _infer_input("temp", X["temp"].to_numpy(np.float32).reshape(-1, 1), "FP32",
                         binary_in),
            _infer_input("pressure", X["pressure"].to_numpy(np.float32).reshape(-1, 1), "FP32",
                         binary_in),
            _infer_input("color", X["color"].to_numpy(object).reshape(-1, 1), "BYTES",
                         binary_in)]
        result = client.infer("sensors", inputs)
    columns = {c: X[c].to_numpy() for c in X.columns}
    direct = served_columns.agent.predict(columns)
    own = _bundle_model(columns_bundle.path, keypair).predict(columns)
    labels = _texts(result.as_numpy("label"))
    assert labels == list(direct.labels) == list(own.labels)
    assert set(labels) == {"alarm", "ok"}
    np.testing.assert_array_equal(result.as_numpy("probabilities"), direct.probabilities)
    assert own.probabilities is not None
    np.testing.assert_allclose(result.as_numpy("probabilities"), own.probabilities, atol=1e-6)


def test_triton_infer_regressor(served_regressor: Served, regressor_bundle: Any,
                                keypair: Any) -> None:
    """A regressor answers label, value (FP32 [n]) and prediction_id."""
    X, _ = make_regression_data(n=450, d=4, seed=7)
    X = np.ascontiguousarray(X[-6:], dtype=np.float32)
    with _client(served_regressor) as client:
        meta = client.get_model_metadata("load", "0.3.1")
        assert [o["name"] for o in meta["outputs"]] == ["label", "value", "prediction_id"]
        for binary in (True, False):
            result = client.infer("load", [_infer_input("input", X, "FP32", binary)],
                                  model_version="0.3.1")
            values = result.as_numpy("value")
            assert values.dtype == np.float32 and values.shape == (6,)
            np.testing.assert_array_equal(values, served_regressor.agent.predict(X).values)
            own = _bundle_model(regressor_bundle.path, keypair).predict(X)
            assert own.values is not None
            np.testing.assert_allclose(values, own.values, rtol=1e-6)
            assert result.as_numpy("probabilities") is None


def test_triton_infer_signal_windows(served_signal: Served, signal_bundle: Any) -> None:
    """A signal bundle takes one FP32 tensor "signal" [rows, window length]."""
    X, _ = signal_windows(450, 64, seed=2)
    X = np.ascontiguousarray(X[-4:], dtype=np.float32)
    with _client(served_signal) as client:
        meta = client.get_model_metadata("vibration")
        assert meta["inputs"] == [{"name": "signal", "datatype": "FP32", "shape": [-1, 64]}]
        result = client.infer("vibration", [_infer_input("signal", X, "FP32", True)])
    direct = served_signal.agent.predict(X)
    assert _texts(result.as_numpy("label")) == list(direct.labels)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), direct.probabilities)


def test_triton_client_sees_clear_errors(served_classifier: Served) -> None:
    """A bad request raises InferenceServerException with status 400 and the server's message."""
    with _client(served_classifier) as client, pytest.raises(InferenceServerException) as err:
        client.infer("small", [_infer_input("input", _rows(2)[:, :5], "FP32", True)])
    assert err.value.status() == "400"
    assert "input 'input' has shape [2, 5]; expected [rows, 6]" in err.value.message()


# --- the binary extension on the wire ------------------------------------------------------


def test_binary_request_and_response_layout(served_columns: Served) -> None:
    """JSON then raw tensors, sized by Inference-Header-Content-Length, both ways."""
    texts = [b"red", b"blue"]
    raw_text = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    raw_temp = np.array([20.0, 31.0], "<f4").tobytes()
    doc = {"id": "x1", "inputs": [
        {"name": "temp", "shape": [2], "datatype": "FP32",
         "parameters": {"binary_data_size": len(raw_temp)}},
        {"name": "pressure", "shape": [2, 1], "datatype": "FP64", "data": [[1.0], [1.4]]},
        {"name": "color", "shape": [2, 1], "datatype": "BYTES",
         "parameters": {"binary_data_size": len(raw_text)}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                    {"name": "prediction_id"}]}
    head = orjson.dumps(doc)
    status, headers, body = served_columns.request(
        "POST", "/v2/models/sensors/versions/2.0.0/infer", head + raw_temp + raw_text,
        {"Inference-Header-Content-Length": str(len(head))})
    assert status == 200, body
    assert headers["content-type"] == "application/octet-stream"
    n = int(headers["inference-header-content-length"])
    answer = orjson.loads(body[:n])
    assert answer["id"] == "x1" and answer["model_name"] == "sensors"
    label, pid = answer["outputs"]
    assert label["parameters"]["binary_data_size"] == len(body) - n and "data" not in label
    assert pid["datatype"] == "BYTES" and len(pid["data"]) == 2
    tail, got = body[n:], []
    while tail:
        (k,) = struct.unpack_from("<I", tail)
        got.append(tail[4:4 + k].decode())
        tail = tail[4 + k:]
    expected = served_columns.agent.predict({"temp": [20.0, 31.0], "pressure": [1.0, 1.4],
                                             "color": ["red", "blue"]})
    assert got == list(expected.labels)


# --- plain JSON ----------------------------------------------------------------------------


def test_predict_one_row_by_name(served_classifier: Served, small_bundle: Any,
                                 keypair: Any) -> None:
    """/v1/predict with named features answers one prediction with labelled probabilities."""
    names = [f.name for f in small_bundle.manifest.inputs]
    x = _rows(1)[0]
    status, doc = served_classifier.json("POST", "/v1/predict",
                                         {"inputs": dict(zip(names, x.tolist(), strict=True))})
    assert status == 200, doc
    own = _bundle_model(small_bundle.path, keypair).predict(x.reshape(1, -1))
    assert ID.match(doc["prediction_id"]) and doc["label"] == own.labels[0]
    assert list(doc["probabilities"]) == ["0", "1"] and doc["value"] is None
    assert own.probabilities is not None
    np.testing.assert_allclose(list(doc["probabilities"].values()), own.probabilities[0],
                               atol=1e-6)
    assert doc["model"] == {"name": "small", "version": "1.2.0"}


def test_predict_rows(served_classifier: Served, small_bundle: Any) -> None:
    """A list of row objects, or of plain rows, answers one prediction per row, in order."""
    names = [f.name for f in small_bundle.manifest.inputs]
    X = _rows(3)
    direct = served_classifier.agent.predict(X)
    for inputs in ([dict(zip(names, r, strict=True)) for r in X.tolist()], X.tolist()):
        status, doc = served_classifier.json("POST", "/v1/predict", {"inputs": inputs})
        assert status == 200, doc
        assert [p["label"] for p in doc["predictions"]] == list(direct.labels)
        assert len({p["prediction_id"] for p in doc["predictions"]}) == 3
        assert doc["model"]["version"] == "1.2.0"


def test_predict_columns_text_and_missing(served_columns: Served) -> None:
    """Text features and null (missing) values are accepted in plain JSON."""
    row = {"temp": 25.0, "pressure": None, "color": "red"}
    status, doc = served_columns.json("POST", "/v1/predict", {"inputs": row})
    assert status == 200, doc
    assert doc["label"] in ("alarm", "ok") and set(doc["probabilities"]) == {"alarm", "ok"}
    status, doc = served_columns.json("POST", "/v1/predict", {"inputs": [row, row]})
    assert status == 200 and len(doc["predictions"]) == 2


def test_predict_regressor_and_signal(served_regressor: Served, served_signal: Served) -> None:
    """A regressor answers "value"; a signal bundle takes a flat window or a list of windows."""
    status, doc = served_regressor.json("POST", "/v1/predict", {"inputs": [0.1, 0.2, 0.3, 0.4]})
    assert status == 200, doc
    assert doc["probabilities"] is None and isinstance(doc["value"], float)
    X, _ = signal_windows(3, 64, seed=5)
    status, doc = served_signal.json("POST", "/v1/predict", {"inputs": X[0].tolist()})
    assert status == 200 and doc["label"] in ("0", "1"), doc
    status, doc = served_signal.json("POST", "/v1/predict", {"inputs": X.tolist()})
    assert status == 200 and len(doc["predictions"]) == 3, doc


def test_status(served_classifier: Served) -> None:
    """/v1/status is the agent's status."""
    status, doc = served_classifier.json("GET", "/v1/status")
    assert status == 200 and doc["ready"] is True
    assert doc["slots"]["blue"]["version"] == "1.2.0"


# --- feedback ------------------------------------------------------------------------------


def test_feedback(served_columns: Served) -> None:
    """Feedback joins a served prediction: 200, then 409 when repeated; bad label 400."""
    row = {"temp": 30.0, "pressure": 1.3, "color": "red"}
    _, first = served_columns.json("POST", "/v1/predict", {"inputs": row})
    _, second = served_columns.json("POST", "/v1/predict", {"inputs": row})
    status, doc = served_columns.json("POST", "/feedback", {
        "prediction_id": first["prediction_id"], "label": "alarm"})
    assert status == 200, doc
    assert doc["prediction_id"] == first["prediction_id"]
    assert doc["correct"] == (first["label"] == "alarm")
    status, doc = served_columns.json("POST", "/feedback", {
        "prediction_id": first["prediction_id"], "label": "ok"})
    assert status == 409 and "already recorded" in doc["error"]
    status, doc = served_columns.json("POST", "/feedback", {
        "prediction_id": second["prediction_id"], "label": "maybe"})
    assert status == 400 and "'maybe' is not one of the model's labels" in doc["error"]


@pytest.mark.parametrize(("doc", "status", "message"), [
    ({"prediction_id": "00000000-fffff", "label": "ok"}, 404, "is unknown"),
    ({"prediction_id": "00000000-1"}, 400, "'label' is absent"),
    ({"prediction_id": "x", "label": "ok", "note": 1}, 400, "unknown field 'note'"),
    ([1, 2], 400, "expected an object"),
])
def test_feedback_refusals(served_columns: Served, doc: Any, status: int, message: str) -> None:
    """Unknown predictions are 404; a malformed feedback body is 400 naming the field."""
    got, answer = served_columns.json("POST", "/feedback", doc)
    assert got == status and message in answer["error"], answer


# --- bad requests --------------------------------------------------------------------------


def _oip(served: Served, inputs: list[dict[str, Any]], **extra: Any) -> tuple[int, Any]:
    return served.json("POST", "/v2/models/small/infer", {"inputs": inputs, **extra})


def _tensor(**fields: Any) -> dict[str, Any]:
    return {"name": "input", "datatype": "FP32", "shape": [1, 6], "data": [0.5] * 6, **fields}


@pytest.mark.parametrize(("inputs", "extra", "message"), [
    ([_tensor(name="x")], {}, "unknown input 'x'; this model takes ['input' FP32 [-1, 6]]"),
    ([_tensor(shape=[6])], {}, "input 'input' has shape [6]; expected [rows, 6]"),
    ([_tensor(shape=[1, 5], data=[0.5] * 5)], {}, "has shape [1, 5]; expected [rows, 6]"),
    ([_tensor(datatype="BYTES")], {}, "datatype 'BYTES'; expected FP32"),
    ([_tensor(datatype="BOOL")], {}, "datatype 'BOOL'; expected FP32"),
    ([_tensor(data=[0.5] * 5 + ["hot"])], {}, "element 5 = 'hot' is not a number"),
    ([_tensor(data=[0.5] * 7)], {}, "\"data\" holds 7 values; its shape needs 6"),
    ([_tensor(shape=[2, 6])], {}, "\"data\" holds 6 values; its shape needs 12"),
    ([_tensor(), _tensor()], {}, "input 'input' is given twice"),
    ([], {}, "expected a non-empty list of tensors"),
    ([_tensor(data=None)], {}, "\"data\" is NoneType; expected a list of numbers"),
    ([_tensor()], {"outputs": [{"name": "scores"}]}, "unknown output 'scores'"),
    ([_tensor()], {"id": 5}, "\"id\" = 5; expected a string"),
])
def test_infer_refuses_bad_inputs(served_classifier: Served, inputs: list[dict[str, Any]],
                                  extra: dict[str, Any], message: str) -> None:
    """Each malformed inference request is a 400 naming the input, the value and what's expected."""
    status, doc = _oip(served_classifier, inputs, **extra)
    assert status == 400 and message in doc["error"], doc


def test_infer_refuses_bad_binary_sizes(served_classifier: Served) -> None:
    """Binary data whose size disagrees with the shape or the body is a 400 saying so."""
    raw = np.zeros(6, "<f4").tobytes()
    cases = [(raw[:20], 20, "binary_data_size is 20 bytes; shape [1, 6] of FP32 needs 24"),
             (raw, 40, "binary_data_size 40 runs past the end of the body"),
             (raw + b"xx", 24, "2 bytes of binary data after the inputs")]
    for tail, size, message in cases:
        head = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 6],
                                         "parameters": {"binary_data_size": size}}]})
        status, _, body = served_classifier.request(
            "POST", "/v2/models/small/infer", head + tail,
            {"Inference-Header-Content-Length": str(len(head))})
        assert status == 400 and message in orjson.loads(body)["error"], body


@pytest.mark.parametrize("path", ["/v2/models/small/infer", "/v1/predict", "/feedback"])
def test_malformed_json_is_400(served_classifier: Served, path: str) -> None:
    """A body that is not JSON is a 400 saying so, on every POST endpoint."""
    status, _, body = served_classifier.request("POST", path, b'{"inputs": [1, 2')
    assert status == 400 and "not valid JSON" in orjson.loads(body)["error"]


def test_predict_refuses_unknown_and_absent_features(served_classifier: Served) -> None:
    """/v1/predict names the unknown feature, and the absent "inputs" field."""
    status, doc = served_classifier.json("POST", "/v1/predict", {"inputs": {"f_zz": 1.0}})
    assert status == 400 and "unknown feature 'f_zz'" in doc["error"], doc
    status, doc = served_classifier.json("POST", "/v1/predict", {"rows": []})
    assert status == 400 and "unknown field 'rows'" in doc["error"], doc
    status, doc = served_classifier.json("POST", "/v1/predict", {})
    assert status == 400 and "\"inputs\" is absent" in doc["error"], doc


def test_body_over_the_limit_is_413_and_the_server_stays_up(
        serve: Callable[..., Served], small_bundle: Any) -> None:
    """A body over http.max_body_bytes is refused unread (413 naming the limit); serving goes on."""
    served = serve(small_bundle.path, max_body_bytes=1024)
    big = orjson.dumps({"inputs": [_tensor(shape=[40, 6], data=[0.5] * 240)]})
    assert len(big) > 1024
    status, headers, body = served.request("POST", "/v2/models/small/infer", big)
    assert status == 413 and headers["connection"] == "close"
    assert "over the limit of 1024 bytes (http.max_body_bytes)" in orjson.loads(body)["error"]
    # a declared size is refused before any byte of the body is sent
    conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=30)
    conn.putrequest("POST", "/v1/predict")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and b"1000000000 bytes" in resp.read()
    conn.close()
    # so is a chunked body (no Content-Length) once it grows past the limit
    small = [b'{"inputs": [0, 0, ', b"0, 0, 0, 0]}"]
    for chunks, expected in (([big[:600], big[600:]], 413), (small, 200)):
        conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=30)
        conn.request("POST", "/v1/predict", body=iter(chunks), encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == expected, resp.read()
        conn.close()
    # so is a small gzip body that inflates past the limit
    status, _, body = served.request("POST", "/v1/predict", gzip.compress(b" " * 5000),
                                     {"Content-Encoding": "gzip"})
    assert status == 413 and b"decompressed body" in body
    status, doc = served.json("POST", "/v2/models/small/infer", {"inputs": [_tensor()]})
    assert status == 200, doc


@pytest.mark.parametrize(("method", "path", "status", "message"), [
    ("GET", "/v2/models/other", 404, "model 'other' is not served; this agent serves 'small'"),
    ("POST", "/v2/models/other/infer", 404, "model 'other' is not served"),
    ("POST", "/v2/models/small/versions/9.0.0/infer", 404, "'small version 9.0.0' is not"),
    ("GET", "/v2/models/small/versions/9.0.0/ready", 404, "is not served"),
    ("GET", "/nowhere", 404, "no such endpoint: '/nowhere'"),
    ("GET", "/v2/models/small/stats", 404, "no such endpoint"),
    ("GET", "/v1/predict", 405, "GET is not allowed on /v1/predict; use POST"),
    ("POST", "/v2/health/live", 405, "use GET"),
    ("GET", "/v2/models/small/infer", 405, "use POST"),
])
def test_unknown_models_paths_and_methods(served_classifier: Served, method: str, path: str,
                                          status: int, message: str) -> None:
    """Unknown models and paths are 404, wrong methods 405, each with a JSON error."""
    body = orjson.dumps({"inputs": [_tensor()]}) if method == "POST" else None
    got, headers, raw = served_classifier.request(method, path, body)
    assert got == status and headers["content-type"] == "application/json"
    assert message in orjson.loads(raw)["error"], raw
    if status == 405:
        assert headers["allow"] in ("GET", "POST")


# --- readiness and running -----------------------------------------------------------------


def test_not_ready_without_a_bundle(serve: Callable[..., Served]) -> None:
    """With no verified model: live 200, ready 503, infer and predict 503, model ready 404."""
    served = serve(None)
    assert served.request("GET", "/v2/health/live")[0] == 200
    status, doc = served.json("GET", "/v2/health/ready")
    assert status == 503 and "no verified model is serving" in doc["error"]
    status, doc = served.json("POST", "/v2/models/small/infer", {"inputs": [_tensor()]})
    assert status == 503 and "no bundle installed" in doc["error"]
    status, doc = served.json("POST", "/v1/predict", {"inputs": [0.0] * 6})
    assert status == 503
    assert served.json("GET", "/v2/models/small/ready")[0] == 404
    with _client(served) as client:
        assert client.is_server_live() and not client.is_server_ready()


def test_stop_closes_the_port(serve: Callable[..., Served], small_bundle: Any) -> None:
    """RunningServer.stop() shuts the server down: the port then refuses connections."""
    served = serve(small_bundle.path)
    assert served.request("GET", "/v2/health/ready")[0] == 200
    served.server.stop()
    with pytest.raises(ConnectionRefusedError):
        served.request("GET", "/v2/health/live")


@pytest.mark.slow
def test_serve_forever_returns_after_sigterm(tmp_path: Path, keypair: Any,
                                             small_bundle: Any) -> None:
    """serve_forever serves until SIGTERM, then returns so the caller can close the agent."""
    script = textwrap.dedent(f"""
        import logging, sys
        from edge_agent.agent import Agent
        from edge_agent.config import AgentConfig
        from edge_agent.http_api import serve_forever
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        agent = Agent(AgentConfig(data_dir={str(tmp_path)!r},
                                  trusted_keys=[{str(keypair.public_path)!r}],
                                  bundle={str(small_bundle.path)!r}))
        serve_forever(agent, "127.0.0.1", 0)
        agent.close()
        print("agent closed", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read_lines() -> None:
        for line in proc.stdout or []:
            lines.put(line)

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    try:
        port = None
        while port is None:
            line = lines.get(timeout=120)
            found = re.search(r"local API listening on http://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert proc.stdout is not None
    proc.stdout.close()
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert "agent closed\n" in rest, rest
