"""The edgefleet device agent: bundle verification, offline inference, preprocessing kernels.

Later issues add drift sketches in SQLite, the outbox and MQTT sync, and the blue-green swap.
"""
