"""XMPP features, one module per XEP (or per RFC 6121 part), each installing itself."""
