"""Presence: online / away / do-not-disturb / offline, merged from every connection of a user,
whatever its transport (Socket.IO tabs, XMPP sessions), with a manual state kept apart."""
