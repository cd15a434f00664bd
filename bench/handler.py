"""The bench's python handler: echo what the peer sends until it half-closes, then exit.

The same code runs two ways, which is the point of the comparison:

* in superd, as ``python: "handler.py:handle"``: imported once when the table is loaded and
  called in a forked child for each connection (no exec, no interpreter start-up);
* as a script, exec'd per connection by xinetd (``server = python``,
  ``server_args = handler.py``): the connected socket is fd 0, as inetd hands it over.
"""

import os
import socket
import sys


def handle(sock, env):
    while True:
        data = sock.recv(65536)
        if not data:
            return 0
        sock.sendall(data)


if __name__ == "__main__":
    sys.exit(handle(socket.socket(fileno=0), dict(os.environ)))
