"""Counter backends behind one interface (``base.CounterBackend``): memory, Redis (standalone/Cluster/Sentinel)."""
