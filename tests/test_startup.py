"""What every agent start imports: nothing that only some requests need.

``twistd`` imports the plugin file at each start, and the agent's idle memory and start-up time
are mostly imports (``docs/benchmarks.md``), so these check, in a fresh interpreter, that the
heavy modules only some requests need stay unloaded until then, and that the lazy endpoint
parsers still load their real code when an endpoint string names them.
"""

from __future__ import annotations

import json
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

# Loaded on first use only: the host client, the vsock endpoint, HTTP probes, archives.
ON_DEMAND = (
    "pyro_reactor.client.endpoints",
    "pyro_reactor.client.api",
    "pyro_reactor.client.calls",
    "pyro_reactor.client.commands",
    "pyro_reactor.system.vsock",
    "twisted.web.client",
    "tarfile",
    "pyro_reactor.capabilities.ports.relay",
    "pyro_reactor.capabilities.watch.tree",
    "twisted.internet.inotify",
)


def loadedAfter(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


class StartupImportTests(SynchronousTestCase):
    def test_pluginDiscoveryStaysCheap(self) -> None:
        """twistd's plugin discovery loads our plugin file without any endpoint code."""
        loaded = loadedAfter(
            "from twisted.application.service import IServiceMaker\n"
            "from twisted.plugin import getPlugins\n"
            "makers = [p.tapname for p in getPlugins(IServiceMaker)]\n"
            "assert 'pyro-agent' in makers, makers"
        )
        self.assertIn("twisted.plugins.pyro_reactor_plugins", loaded)
        self.assertEqual(sorted(loaded & set(ON_DEMAND)), [])

    def test_agentOnTcpLoadsNothingOnDemand(self) -> None:
        """Building the agent's service for a TCP endpoint loads none of the on-demand code."""
        loaded = loadedAfter(
            "import tempfile\n"
            "from pyro_reactor import tap\n"
            "base = tempfile.mkdtemp()\n"
            "options = tap.Options()\n"
            "options.parseOptions(['--listen', 'tcp:0:interface=127.0.0.1',"
            " '--workspace', base + '/ws', '--state-dir', base + '/state'])\n"
            "tap.makeService(options)"
        )
        self.assertIn("pyro_reactor.capabilities.archives", loaded)
        self.assertEqual(sorted(loaded & set(ON_DEMAND)), [])

    def test_lazyParsersLoadTheirEndpoints(self) -> None:
        """The first string naming vsock:/fcvsock: loads the real parser behind the plugin."""
        loaded = loadedAfter(
            "from twisted.internet.endpoints import clientFromString, serverFromString\n"
            "from twisted.internet.testing import MemoryReactor\n"
            "server = serverFromString(MemoryReactor(), 'vsock:5005')\n"
            "assert type(server).__name__ == 'VSockServerEndpoint', server\n"
            "client = clientFromString(MemoryReactor(), 'fcvsock:path=/v.sock:port=5005')\n"
            "assert type(client).__name__ == 'FirecrackerVSockClientEndpoint', client"
        )
        self.assertIn("pyro_reactor.system.vsock", loaded)
        self.assertIn("pyro_reactor.client.endpoints", loaded)
