"""Marks the installed copy of conf/ (the package data gd/conf) as a package: hydra reads it as pkg://gd.conf."""
