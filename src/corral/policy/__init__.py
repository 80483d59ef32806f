"""Sandbox policy: user input (spec), its safe defaults and its compilation into runtime plans.

Pure: nothing in this package does I/O.
"""
