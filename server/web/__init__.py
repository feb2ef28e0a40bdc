"""HTTP side: REST conventions (problem+json, OpenAPI), routes, and the aiohttp application."""
