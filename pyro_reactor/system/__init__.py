"""The platform under the capabilities: workspace paths, processes, vsock sockets.

Modules here import nothing from L{pyro_reactor.wire} or L{pyro_reactor.capabilities}.
"""
