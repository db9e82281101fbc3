"""A small durable state-machine engine on SQL.

Runs, their audit events, published data, a step journal, leases, locks and signals.
"""
