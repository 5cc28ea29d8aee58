"""Benchmarks are run with `make bench`, never collected by pytest (`make test`)."""

collect_ignore_glob = ["*"]
