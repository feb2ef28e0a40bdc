"""REST routes, one module per area; all declared on the one ``api`` registry."""

from server import __version__
from server.web.api import Api

api = Api("Portal Hub API", __version__)
