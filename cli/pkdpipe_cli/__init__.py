"""The pkdpipe command line (installed as the `pkdpipe_cli` package): flags in, one library call out."""
