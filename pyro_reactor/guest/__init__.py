"""Files for running the agent in a guest, shipped as package data (no Python code here).

- ``pyro-agent.service``: the systemd unit (``/etc/systemd/system/pyro-agent.service``).
- ``pyro-agent.init``: a plain POSIX init script for guests without systemd
  (``/etc/init.d/pyro-agent``), which also supervises the agent and restarts it.
- ``pyro-agent.default``: the settings both read (``/etc/default/pyro-agent``).

``docs/guest-image.md`` says how to put them into a Firecracker root filesystem; find them in an
installed agent with ``python3 -c 'import pyro_reactor.guest as g; print(g.__path__[0])'``.
"""
