"""Importing this module declares every route on ``api``."""

from server.web.routes import (
    api,
    auth,
    crm,
    departments,
    files,
    im,
    mail,
    portal,
    presence,
    tasks,
    users,
    workgroups,
    xmpp,
)

ROUTE_MODULES = (
    auth,
    users,
    departments,
    workgroups,
    im,
    files,
    presence,
    tasks,
    crm,
    mail,
    xmpp,
    portal,
)

__all__ = ["ROUTE_MODULES", "api"]
