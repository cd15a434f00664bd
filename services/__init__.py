"""Example handlers shipped with superd.

A package so that a table may name a handler as a module (``python: "services.hello:handle"``)
when the project root is on sys.path, as well as by file (``"../services/hello.py:handle"``).
"""
