"""Errors raised by cloud_hub.

Hierarchy::

    CloudHubError                 base of everything this package raises
    ├── HubStoreError             the hub database cannot be opened, migrated or written (a batch
    │                             that still fails after its retries: the worker must not ack it)
    ├── SelectorError             a tag selector or tag assignment that does not parse
    ├── DeviceNotFound            a device id the registry has never heard from
    ├── QueryError                a fleet query with a bad time range or argument
    ├── MqttConnectionError       the broker cannot be reached, closed the connection or broke
    │                             the protocol (the hub worker logs it and connects again)
    └── BundleError               a bundle file that is truncated, tampered or badly signed
        ├── SignatureError        its signature does not verify against any trusted key
        ├── BundleNotFound        no bundle of that name and version was added to the hub
        └── BundleConflict        another bundle with the same name and version is on the hub

Each message says what failed, the value, what was expected and what to do next. Errors of
SQLAlchemy, psycopg, cryptography and the broker's socket are translated into these once, where
they happen (cloud_hub.store, cloud_hub.bundles, cloud_hub.mqtt_client); the CLI turns them
into one ``error:`` line.
"""

from __future__ import annotations

__all__ = [
    "BundleConflict",
    "BundleError",
    "BundleNotFound",
    "CloudHubError",
    "DeviceNotFound",
    "HubStoreError",
    "MqttConnectionError",
    "QueryError",
    "SelectorError",
    "SignatureError",
]


class CloudHubError(Exception):
    """Base class of every error raised by cloud_hub."""


class HubStoreError(CloudHubError):
    """The hub database failed (after retries, for an ingested batch)."""


class SelectorError(CloudHubError):
    """A tag selector such as ``site=a,cohort=bright`` that does not parse."""


class DeviceNotFound(CloudHubError):
    """No device with that id has sent a valid message to the hub."""


class QueryError(CloudHubError):
    """A fleet query with a bad argument (time range, top, ...)."""


class MqttConnectionError(CloudHubError):
    """The broker cannot be reached, closed the connection, or sent what MQTT does not allow."""


class BundleError(CloudHubError):
    """A bundle cannot be trusted or read."""


class SignatureError(BundleError):
    """A bundle's signature does not verify against any trusted key."""


class BundleNotFound(BundleError):
    """The bundle (name, version) was never added to the hub."""


class BundleConflict(BundleError):
    """A different bundle with the same name and version is already on the hub."""
