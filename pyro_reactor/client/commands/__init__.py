"""The commands of ``pyro-agent-client``, by area, and what they share.

``parser.py`` reads the command line; ``base.py`` holds the exit codes, the L{Console} and
L{CommandBase} (the client, ``say``/``emit``); each other module holds one mixin of
``do_<command>`` methods, put together as L{Runner<pyro_reactor.client.cli.Runner>} in
``cli.py``; ``output.py`` formats what they print.
"""
