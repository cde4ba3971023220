"""A simulated fleet for the hub's tests: real sketches in real layouts, real wire messages."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleet_protocol import messages as msgs
from fleet_protocol import topics
from fleet_protocol.drift import bin_positions
from fleet_protocol.layouts import layouts_of
from fleet_protocol.manifest import BundleManifest
from fleet_protocol.sketch import FeatureLayout, Sketch, SketchLayout
from fleet_protocol.wire import encode

TOY_IN = SketchLayout((
    FeatureLayout("temp", "numeric", edges=(0.0, 10.0, 20.0, 30.0)),
    FeatureLayout("kind", "categorical", categories=("a", "b")),
))
TOY_OUT = SketchLayout((FeatureLayout("label", "categorical", categories=("0", "1")),))


def key_of(lay_in: SketchLayout, lay_out: SketchLayout) -> str:
    return f"{lay_in.fingerprint()}/{lay_out.fingerprint()}"


def sketch(layout: SketchLayout, rng: np.random.Generator, rows: int, *,
           probs: Sequence[np.ndarray] | None = None, tilt: float = 0.0,
           missing: int = 0) -> Sketch:
    """``rows`` values per feature spread over its slots by ``probs`` (default uniform),
    tilted toward the high slots by ``tilt`` (drift), plus ``missing`` missing values."""
    s = Sketch.empty(layout)
    for j, f in enumerate(layout.features):
        k = f.n_slots
        p = np.ones(k) if probs is None else np.asarray(probs[j], dtype=np.float64) + 0.5
        p = p * np.exp(tilt * np.arange(k) / k)
        slots = rng.choice(k, size=rows, p=p / p.sum())
        if f.kind == "numeric":
            values = bin_positions(f.edges)[slots]
            s.update_numeric(j, np.concatenate([values, np.full(missing, np.nan)]))
        else:
            s.update_codes(j, np.concatenate([slots, np.full(missing, -1)]).astype(np.int64))
    return s


@dataclass(frozen=True)
class Sent:
    """A window as a device sent it (the tests' ground truth)."""

    device_id: str
    model_version: str
    start: float
    rows: int
    layout: str
    inputs: Sketch
    outputs: Sketch


def window(device_id: str, start: float, rows: int, rng: np.random.Generator, *,
           manifest: BundleManifest | None = None, model_name: str = "toy",
           model_version: str = "1.0.0", tilt: float = 0.0, length: float = 300.0,
           layouts: tuple[SketchLayout, SketchLayout] | None = None, missing: int = 0
           ) -> tuple[msgs.WindowItem, Sent]:
    """A closed window of ``rows`` rows with values (in the manifest's layouts, drawn from its
    baseline) and ``missing`` more without any: every feature and output missing in them."""
    if layouts is None:
        layouts = layouts_of(manifest) if manifest is not None else (TOY_IN, TOY_OUT)
    lay_in, lay_out = layouts
    probs_in = probs_out = None
    if manifest is not None and layouts_of(manifest)[0] == lay_in:
        model_name, model_version = manifest.name, manifest.version
        probs_in = [np.asarray(b.counts) for b in manifest.baseline.features]
        probs_out = [np.asarray(b.counts) for b in manifest.baseline.outputs]
    s_in = sketch(lay_in, rng, rows, probs=probs_in, tilt=tilt, missing=missing)
    key = key_of(lay_in, lay_out)
    s_out = sketch(lay_out, rng, rows, probs=probs_out, missing=missing)
    served = rows + missing  # as an agent counts them: every row, with its values or not
    item = msgs.window_item_from(
        model_name=model_name, model_version=model_version, slot="blue", start=start,
        end=start + length, layout=key, inputs=s_in.to_bytes(), outputs=s_out.to_bytes(),
        metrics={"requests": served}, rows=served)
    return item, Sent(device_id, model_version, start, served, key, s_in, s_out)


#: the outbox stream the simulated devices send under (one database each, never reset)
STREAM = "5eed5eed5eed5eed"


def envelope(device_id: str, seq: int, items: Sequence[Any], *, message_id: str | None = None,
             sent_at: float = 1.0, stream: str = STREAM) -> msgs.TelemetryEnvelope:
    return msgs.TelemetryEnvelope(
        device_id=device_id, stream=stream, message_id=message_id or str(uuid.uuid4()),
        seq=seq, sent_at=sent_at, agent_version="0.1.0", items=tuple(items))


def event(ts: float = 1.0, name: str = "swap.promoted") -> msgs.EventItem:
    return msgs.EventItem(ts=ts, event=name, detail={"from": "blue"})


def wire(msg: msgs.BaseMessage, topic: str | None = None) -> tuple[str, bytes]:
    """(topic, payload) as the broker hands it to the hub."""
    if topic is None:
        kind = {"TelemetryEnvelope": "telemetry", "StateMessage": "state", "Ack": "ack"}
        topic = topics.topic(msg.device_id, kind[type(msg).__name__])  # type: ignore[arg-type]
    return topic, encode(msg)


def telemetry(device_id: str, seq: int, items: Sequence[Any] | None = None, *,
              message_id: str | None = None, stream: str = STREAM) -> tuple[str, bytes]:
    """A telemetry message holding ``items`` (default: one event)."""
    return wire(envelope(device_id, seq, items or [event()], message_id=message_id,
                         stream=stream))


def state(device_id: str, *, online: bool = True, ts: float = 10.0,
          tags: dict[str, str] | None = None, phase: msgs.SwapPhaseName = "idle",
          health: dict[str, Any] | None = None) -> tuple[str, bytes]:
    if not online:
        return wire(msgs.StateMessage.offline(device_id, agent_version="0.1.0", ts=ts))
    slots = msgs.Slots(blue=msgs.SlotInfo(name="toy", version="1.0.0", sha256="a" * 64))
    return wire(msgs.StateMessage(device_id=device_id, online=True, agent_version="0.1.0",
                                  slots=slots, swap_phase=phase,
                                  health=health or {"ok": True}, tags=tags or {}, ts=ts))
