"""What a scan tells the world: events (sinks, sender, reader), Prometheus
metrics, OpenLineage and logs, behind one ``ScanObserver`` protocol.

Uses ``db`` only (the events table, the scans rows it reports on).
"""
