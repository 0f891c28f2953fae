"""JEDI's DDM interface for a test PanDA without Rucio.

``GenDDMClient`` plus the dataset calls JEDI's generic post-processing makes
(``freezeDataset``), which it lacks. Named in ``panda_jedi.cfg`` ``[ddm] modConfig``.
"""

from pandajedi.jediddm.GenDDMClient import GenDDMClient


class TestDDMClient(GenDDMClient):
    """GenDDMClient that also freezes datasets (there is nothing to freeze)."""

    def freezeDataset(self, dsn, ignoreUnknown=False):  # noqa: N802, N803 - JEDI's names
        """Say the dataset is frozen."""
        return self.SC_SUCCEEDED, True
