"""The handlers, one module per resource, plain functions of a request."""
