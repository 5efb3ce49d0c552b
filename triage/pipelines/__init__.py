"""Preprocessing, routing, post-processing into findings, and the runners that execute them."""
