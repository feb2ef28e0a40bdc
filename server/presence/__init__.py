"""Presence of users across their connections (online / offline for now).

Away and do-not-disturb, multi-device aggregation and XMPP presence come with the messenger.
"""
