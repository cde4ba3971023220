"""Host side of the HTTP step (the agent listens on 127.0.0.1, the chroot shares the host's
network): wait until ready, then the OIP v2 and plain JSON endpoints, answers compared with
what the x86-64 agent computed for the same rows."""
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

port, bundles, started = int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
base = f"http://127.0.0.1:{port}"
out: dict = {}
problems: list[str] = []


def call(method, path, doc=None, timeout=30.0):
    data = None if doc is None else json.dumps(doc).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


deadline = time.time() + 180
status = None
while time.time() < deadline:
    try:
        status, _ = call("GET", "/v2/health/ready", timeout=2)
        if status == 200:
            break
    except (urllib.error.URLError, ConnectionError, OSError):
        pass
    time.sleep(0.1)
out["ready_after_s"] = round(time.time() - started, 2)
if status != 200:
    print(json.dumps({"error": f"not ready within 180 s (last status {status})"}))
    sys.exit(1)

exp = np.load(bundles / "logreg-expected.npz")
X, proba, labels = exp["X"], exp["agent_proba"], exp["agent_labels"]
names = [f"f{i}" for i in range(X.shape[1])]
n = 8
s, body = call("POST", "/v2/models/logreg/infer", {"inputs": [
    {"name": "input", "shape": [n, X.shape[1]], "datatype": "FP32",
     "data": X[:n].ravel().tolist()}]})
out["first_infer_after_s"] = round(time.time() - started, 2)
if s != 200:
    problems.append(f"infer: HTTP {s}: {body}")
else:
    outs = {o["name"]: o for o in body["outputs"]}
    got = np.array(outs["probabilities"]["data"], dtype=np.float32).reshape(n, -1)
    out["infer_max_diff_vs_x86"] = float(np.max(np.abs(got - proba[:n])))
    if out["infer_max_diff_vs_x86"] > 1e-6 or outs["label"]["data"] != labels[:n].tolist():
        problems.append(f"infer answers differ from x86-64: {got.tolist()} vs {proba[:n]}")
for path in ("/v2/health/live", "/v2", "/v2/models/logreg", "/v2/models/logreg/ready"):
    s, body = call("GET", path)
    if s != 200:
        problems.append(f"GET {path}: HTTP {s}: {body}")
s, body = call("GET", "/v2/models/nosuchmodel")
if s != 404:
    problems.append(f"GET /v2/models/nosuchmodel: HTTP {s}, expected 404")

# plain JSON, one row per request (as a sensor loop would), latency under emulation
lat = []
first_id = None
for i in range(200):
    t = time.perf_counter()
    s, body = call("POST", "/v1/predict", {"inputs": dict(zip(names, X[i].tolist(), strict=True))})
    lat.append(time.perf_counter() - t)
    if s != 200:
        problems.append(f"/v1/predict row {i}: HTTP {s}: {body}")
        break
    p = np.array([body["probabilities"][k] for k in sorted(body["probabilities"])])
    if np.max(np.abs(p - proba[i])) > 1e-6 or body["label"] != labels[i]:
        problems.append(f"/v1/predict row {i}: {body} vs {proba[i]} {labels[i]}")
        break
    first_id = first_id or body["prediction_id"]
out["predict_p50_ms"] = round(float(np.median(lat)) * 1e3, 2)
out["predict_p99_ms"] = round(float(np.quantile(lat, 0.99)) * 1e3, 2)
s, body = call("POST", "/feedback", {"prediction_id": first_id, "label": str(labels[0])})
if s != 200:
    problems.append(f"/feedback: HTTP {s}: {body}")
s, body = call("POST", "/v1/predict", {"inputs": {"f0": "warm"}})
out["bad_input_status"] = s  # a refusal naming the input, not a crash
if s != 400:
    problems.append(f"/v1/predict with a bad row: HTTP {s}, expected 400: {body}")
s, body = call("GET", "/v1/status")
if s != 200 or not body.get("ready"):
    problems.append(f"/v1/status: HTTP {s}: {str(body)[:300]}")
out["problems"] = problems
print(json.dumps(out))
print(f"ready {out['ready_after_s']} s after start, first infer {out['first_infer_after_s']} s; "
      f"infer max diff vs x86-64 {out.get('infer_max_diff_vs_x86', 'n/a')}; 200 x /v1/predict "
      f"p50 {out['predict_p50_ms']} ms; feedback, metadata, 404, 400 as expected"
      if not problems else "; ".join(problems)[:500])
sys.exit(1 if problems else 0)
