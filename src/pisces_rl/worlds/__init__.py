"""Synthetic worlds that can be built from nothing: a captioned video corpus, prompts and a programmatic judge.

``pisces_rl.worlds.shapes`` (ShapesWorld) is the default world for offline runs and tests.
"""
