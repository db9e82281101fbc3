"""Cluster backends: simulated, VMM and Failover Clustering, behind one Protocol (base.py)."""
