"""Fixtures for the agent: more small real bundles, agents served on a free loopback port, and an
agent store with an outbox (the sync tests')."""

from __future__ import annotations

import http.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pytest

from edge_agent.store import AgentStore
from tests.conftest import make_regression_data, signal_windows

if TYPE_CHECKING:
    from edge_agent.agent import Agent
    from edge_agent.http_api import RunningServer


def swap_config(tmp_path: Path, keypair: Any, bundle: Path, **swap: Any) -> Any:
    """An agent config for swap tests: 60 s windows, fast flushes, SwapConfig(**swap)."""
    from edge_agent.config import AgentConfig, SwapConfig, TelemetryConfig

    return AgentConfig(data_dir=tmp_path / "data", trusted_keys=(keypair.public_path,),
                       bundle=bundle, telemetry=TelemetryConfig(window_seconds=60,
                                                                flush_interval_seconds=0.05),
                       swap=SwapConfig(**swap))


def sensor_frame(n: int, seed: int) -> tuple[Any, np.ndarray]:
    """Two numeric columns and one text column; labels "alarm" / "ok"."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    temp = rng.normal(20, 5, n)
    pressure = rng.normal(1.0, 0.2, n)
    color = rng.choice(["red", "green", "blue"], n)
    logit = 0.4 * (temp - 20) + 3 * (pressure - 1) + np.where(color == "red", 1.5, -0.5)
    y = np.where(logit + rng.normal(0, 0.5, n) > 0, "alarm", "ok")
    return pd.DataFrame({"temp": temp, "pressure": pressure, "color": color}), y


@pytest.fixture(scope="session")
def columns_bundle(compile_fast: Callable[..., Any]) -> Any:
    """ColumnTransformer(StandardScaler on 2 numeric, OneHotEncoder on 1 text) + LogReg."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    X, y = sensor_frame(600, seed=3)
    prep = ColumnTransformer([("num", StandardScaler(), ["temp", "pressure"]),
                              ("cat", OneHotEncoder(handle_unknown="ignore"), ["color"])])
    model = Pipeline([("prep", prep), ("clf", LogisticRegression())])
    model.fit(X.iloc[:400], y[:400])
    return compile_fast(model, X, y, name="sensors", version="2.0.0")


@pytest.fixture(scope="session")
def regressor_bundle(compile_fast: Callable[..., Any]) -> Any:
    """StandardScaler + Ridge on 4 features."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = make_regression_data(n=450, d=4, seed=7)
    model = make_pipeline(StandardScaler(), Ridge()).fit(X[:300], y[:300])
    return compile_fast(model, X, y, name="load", version="0.3.1")


@pytest.fixture(scope="session")
def signal_bundle(compile_fast: Callable[..., Any]) -> Any:
    """Numba window features on 64-sample windows, then StandardScaler + LogReg."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from compiler.preprocessing import WindowFeatures

    X, y = signal_windows(450, 64, seed=2)
    model = Pipeline([("feat", WindowFeatures(n_bands=4)), ("scale", StandardScaler()),
                      ("clf", LogisticRegression())]).fit(X[:300], y[:300])
    return compile_fast(model, X, y, name="vibration", version="1.0.0")


@dataclass
class Served:
    """An Agent behind a real server, with a small raw HTTP client (http.client)."""

    agent: Agent
    server: RunningServer
    bundle_path: Path | None

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"127.0.0.1:{self.server.port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
        body = None if doc is None else orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        status, headers, raw = self.request(method, path, body,
                                            {"Content-Type": "application/json"})
        assert headers["content-type"] == "application/json", headers
        return status, orjson.loads(raw)


def start_served(data_dir: Path, keypair: Any, bundle_path: Path | None,
                 max_body_bytes: int | None = None) -> Served:
    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig, HttpConfig, TelemetryConfig
    from edge_agent.http_api import serve_in_thread

    http = HttpConfig() if max_body_bytes is None else HttpConfig(max_body_bytes=max_body_bytes)
    config = AgentConfig(data_dir=data_dir, trusted_keys=(keypair.public_path,),
                         bundle=bundle_path, http=http,
                         telemetry=TelemetryConfig(flush_interval_seconds=0.05))
    agent = Agent(config)
    try:
        server = serve_in_thread(agent)
    except BaseException:
        agent.close()
        raise
    return Served(agent, server, bundle_path)


def stop_served(served: Served) -> None:
    try:
        served.server.stop()
    finally:
        served.agent.close()


@pytest.fixture
def serve(tmp_path: Path, keypair: Any) -> Iterator[Callable[..., Served]]:
    """Start an agent (own data dir) behind a server; both are stopped after the test."""
    started: list[Served] = []

    def _serve(bundle_path: Path | None, **kwargs: Any) -> Served:
        served = start_served(tmp_path / f"agent{len(started)}", keypair, bundle_path, **kwargs)
        started.append(served)
        return served

    yield _serve
    for served in started:
        stop_served(served)


def _module_served(tmp_path_factory: pytest.TempPathFactory, keypair: Any,
                   bundle: Any) -> Iterator[Served]:
    served = start_served(tmp_path_factory.mktemp("agent"), keypair, bundle.path)
    yield served
    stop_served(served)


@pytest.fixture(scope="module")
def served_classifier(tmp_path_factory: pytest.TempPathFactory, keypair: Any,
                      small_bundle: Any) -> Iterator[Served]:
    yield from _module_served(tmp_path_factory, keypair, small_bundle)


@pytest.fixture(scope="module")
def served_columns(tmp_path_factory: pytest.TempPathFactory, keypair: Any,
                   columns_bundle: Any) -> Iterator[Served]:
    yield from _module_served(tmp_path_factory, keypair, columns_bundle)


@pytest.fixture(scope="module")
def served_regressor(tmp_path_factory: pytest.TempPathFactory, keypair: Any,
                     regressor_bundle: Any) -> Iterator[Served]:
    yield from _module_served(tmp_path_factory, keypair, regressor_bundle)


@pytest.fixture(scope="module")
def served_signal(tmp_path_factory: pytest.TempPathFactory, keypair: Any,
                  signal_bundle: Any) -> Iterator[Served]:
    yield from _module_served(tmp_path_factory, keypair, signal_bundle)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AgentStore]:
    s = AgentStore(tmp_path / "agent.db", outbox_quota_bytes=64 * 1024 * 1024)
    yield s
    s.close()
