"""Child-process scripts for the unit tests; each runs as ``python <script> ...`` and adds the repo to sys.path."""
