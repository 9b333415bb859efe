"""lalora on Flower (extra ``lalora[flower]``): the same client update, schedule and aggregation as
the in-process engine, carried by Flower messages, from one machine (Ray simulation) to a
SuperLink/SuperNode deployment. See docs/FLOWER.md.

- :func:`run_flower` -- one experiment through Flower (``lalora run --engine flower``);
- ``lalora.flower.client_app:app`` / :func:`make_client_app` -- the ClientApp;
- :class:`LaLoraStrategy` / :func:`make_server_app` -- the Strategy and the ServerApp;
- ``lalora.flower.encoding`` -- what each message carries.

Importing this package does not import flwr; the submodules do.
"""
from __future__ import annotations

__all__ = ["run_flower", "make_client_app", "make_server_app", "LaLoraStrategy", "FlowerRunResult"]


def __getattr__(name):
    if name in ("run_flower", "FlowerRunResult"):
        from lalora.flower import run

        return getattr(run, name)
    if name == "make_client_app":
        from lalora.flower.client_app import make_client_app

        return make_client_app
    if name in ("make_server_app", "LaLoraStrategy"):
        from lalora.flower import server_app

        return getattr(server_app, name)
    raise AttributeError(name)
