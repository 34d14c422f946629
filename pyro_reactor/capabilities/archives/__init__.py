"""Archives in and out of the guest: ``extract_archive``, ``install_secrets``, ``export_archive``.

- L{members}: the member plan, every member checked before anything is written;
- L{extract}: writing a plan all or nothing, across a crash too (stages, journal, recovery);
- L{secrets}: a secret set swapped in whole, and recovered whole after a crash;
- L{export}: a workspace path as a tar in a spool file;
- L{progress}: progress events of long transfers;
- L{capability}: L{ArchivesCapability}, the three actions.
"""

from pyro_reactor.capabilities.archives.capability import ArchivesCapability
from pyro_reactor.capabilities.archives.export import ExportTooLarge, buildExport, tarInfoFor
from pyro_reactor.capabilities.archives.extract import (
    CHUNK,
    STAGE_PREFIX,
    _kernelCopy,
    applySteps,
    extractArchive,
    recoverExtracts,
)
from pyro_reactor.capabilities.archives.members import (
    Kind,
    _filteredMode,
    checkSymlinkTarget,
    normalizeMemberName,
)
from pyro_reactor.capabilities.archives.progress import PROGRESS_INTERVAL, Transfer
from pyro_reactor.capabilities.archives.secrets import (
    SECRETS_STAGE_PREFIX,
    exchange,
    installSecrets,
    recoverSecrets,
)

__all__ = [
    "CHUNK",
    "PROGRESS_INTERVAL",
    "SECRETS_STAGE_PREFIX",
    "STAGE_PREFIX",
    "ArchivesCapability",
    "ExportTooLarge",
    "Kind",
    "Transfer",
    "_filteredMode",
    "_kernelCopy",
    "applySteps",
    "buildExport",
    "checkSymlinkTarget",
    "exchange",
    "extractArchive",
    "installSecrets",
    "normalizeMemberName",
    "recoverExtracts",
    "recoverSecrets",
    "tarInfoFor",
]
