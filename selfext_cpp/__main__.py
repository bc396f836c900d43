"""`python -m selfext_cpp` is the `selfext` command."""

from selfext_cpp.cli.app import main

main()
