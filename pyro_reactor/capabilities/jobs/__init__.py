"""Jobs: durable, streaming processes the host starts, follows, feeds and stops (issue 12).

``_machine`` holds the lifecycle alone, ``records`` the files under ``pyro-jobs/``, ``output``
the following of the output files, ``registry`` the jobs (the service), ``job`` one job,
``runners`` the runner processes, ``stdin`` the bounded queue of what hosts send to a job's
stdin, ``attach`` the attach stream, ``actions`` the request handlers and L{JobsCapability};
``_runner`` is the small program that sits between the agent and each command and outlives
the agent.
"""

from pyro_reactor.capabilities.jobs.actions import JobsCapability

__all__ = ["JobsCapability"]
