"""The `selfext` command line (installed as selfext_cpp.cli)."""
