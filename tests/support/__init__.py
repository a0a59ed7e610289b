"""Helpers shared by the integration, cluster and chaos tests."""
