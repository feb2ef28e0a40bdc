"""XMPP client-to-server endpoint (RFC 6120/6121): Jabber clients log in with portal credentials.

A small core (``xmlstream``, ``session``, ``server``) routes stanzas; every protocol feature is
a module in ``server/xmpp/modules/`` that registers its handlers and disco features, as
Prosody's plugins do, so what the server announces is what it implements.
"""
