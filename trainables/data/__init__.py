"""Data formats of the learning side: data sets, their typed spec and the stored annotation record."""
