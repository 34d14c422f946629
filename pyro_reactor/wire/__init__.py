"""The wire: framing of requests and answers, the action registry, typed request fields.

Nothing here knows any capability: the protocol gets a L{Dispatcher} of actions and hands it
whole requests.
"""
