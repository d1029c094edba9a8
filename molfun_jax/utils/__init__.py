"""Feature and geometry utilities (OpenFold `openfold/utils`)."""
