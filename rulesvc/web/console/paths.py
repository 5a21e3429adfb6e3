"""Where the console lives, apart from the rest of it: the API's middlewares need only this."""

CONSOLE_PREFIX = "/console"
