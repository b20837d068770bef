"""In-memory emulators of cloud classification services, served on 127.0.0.1.

They implement the subset of each service's REST API that its provider uses,
with the same request and response shapes, so tests and cassette recordings
run without credentials or network access.
"""
