"""Security-context (SC) transfer between host agents: wire format, PKI, TLS channel."""
