"""Counters shown as badges. Values are ephemeral: pushed live and sent as a snapshot."""
