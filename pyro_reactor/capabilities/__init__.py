"""What the agent can do, one module or package per capability.

Each capability is an object built once from the L{AgentContext}: the actions it serves, the
optional features it announces in ``ping``, and the service (if any) it starts and stops with
the agent. L{pyro_reactor.agent} holds the list.
"""
