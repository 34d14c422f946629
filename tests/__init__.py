"""Tests of pyro-reactor; trial TestCases, so that both ``trial tests`` and ``pytest`` run them."""
