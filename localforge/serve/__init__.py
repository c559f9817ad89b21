"""`localforge serve`: an OpenAI-compatible HTTP API over any localforge backend.

``app.create_app(backend, ...)`` is the FastAPI app (routes, limits, auth); ``protocol`` reads
OpenAI requests into localforge's types and writes answers and errors back; ``gate`` admits
requests (so many at once, so many waiting, 429 beyond). It reaches engines only through
``localforge.backends``. FastAPI loads when ``app`` is imported, not with this package.
"""
