"""The web console under /console/: server-rendered pages over the API's own operations, behind a login
with an API key (`setup.setup_console` adds it to the app)."""
