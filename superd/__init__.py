"""superd: an inetd-like super-server with one poll loop and a YAML service table."""

__version__ = "0.1.0"
