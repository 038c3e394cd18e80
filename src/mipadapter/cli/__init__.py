"""Command-line shells over the library: argument parsing and one library call each."""
