"""The calls of L{AgentClient<pyro_reactor.client.api.AgentClient>}, by area.

Each module holds one mixin of calls over L{CallBase<pyro_reactor.client.calls.base.CallBase>}
(``base.py``: the endpoint, the timeouts and the one exchange every call goes through);
``api.py`` puts them together as ``AgentClient``.
"""
