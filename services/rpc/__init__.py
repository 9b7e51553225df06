"""Plumbing shared by every gRPC service: domain errors -> status codes, server bootstrap."""
