"""A small durable state-machine engine on SQL: runs, audit events, published data, a step journal."""
