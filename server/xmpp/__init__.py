"""XMPP client-to-server endpoint (RFC 6120/6121). Not built yet: see the XMPP issue."""
