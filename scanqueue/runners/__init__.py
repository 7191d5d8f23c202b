"""What runs inside a scan: the Runner API and the stub, the real runner,
its store (providers, checks, findings) and the provider kinds.

Uses ``db`` (and ``config``/``errors``) only.
"""
