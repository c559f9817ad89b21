"""The face: one module per verb of the `localforge` command (``cli.py`` gathers them).

A command parses, builds the job's settings, calls the library and renders progress and results.
Modules here import only typer and the light core at import time, so `localforge --help` stays fast.
"""
