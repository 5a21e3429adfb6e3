"""The HTTP API: the aiohttp app, its routes, middlewares, views and OpenAPI document."""
